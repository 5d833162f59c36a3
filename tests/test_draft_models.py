"""The speculative draft's parts: the distillation loss against hand arithmetic, and the elastic-token ViT
(exact at budget 1.0, pruning and pooling counts, the Gumbel gate's gradient, eval grouping, ONNX export)."""
import math
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from train.models.distill import DistillationLoss, FeatureProjection, kl_divergence, soft_cross_entropy
from train.models.elastic import ElasticViT, elastic_vit, pool_kernel

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(img_size: int = 64, **kwargs) -> nn.Module:
    """A 2-block ViT on an 8x8 grid of 8-pixel patches (64 patch tokens at 64 px)."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8, depth=2,
                             num_classes=2, **kwargs).eval()


def images(n: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    """Normalised images of varied brightness and contrast (so gates and entropy disagree between them)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.05, 2.0, n)[:, None, None, None]
    shift = torch.linspace(-1.5, 1.5, n)[torch.randperm(n, generator=g)][:, None, None, None]
    return torch.randn(n, 3, size, size, generator=g) * scale + shift


def random_gate(model: ElasticViT, seed: int = 0, std: float = 2.0) -> ElasticViT:
    """A gate that disagrees between images (the trained gate's last layer starts at zero)."""
    torch.manual_seed(seed)
    nn.init.normal_(model.gate.fc2.weight, std=std)
    return model


def sequence_lengths(model: ElasticViT) -> list[int]:
    """Token counts entering the blocks, recorded per block call (hook on the first block)."""
    lengths = []
    model.vit.blocks[0].register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    return lengths


# --- distillation loss, by hand ---------------------------------------------------------------------

def softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


STUDENT = [[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0]]
TEACHER = [[1.0, 0.0], [3.0, -1.0], [0.0, 0.0]]


def hand_soft_ce(student, teacher, t):
    rows = [-sum(p * math.log(q) for p, q in zip(softmax(tr, t), softmax(sr, t))) for sr, tr in zip(student, teacher)]
    return t * t * sum(rows) / len(rows)


def hand_entropy(teacher, t):
    return sum(-sum(p * math.log(p) for p in softmax(tr, t)) for tr in teacher) / len(teacher)


def test_soft_cross_entropy_by_hand():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    # row 0 at T=1: p_teacher = (e/(e+1), 1/(e+1)) = (0.7311, 0.2689); log q_student = (2, -1) - log(e^2 + e^-1)
    lse = math.log(math.exp(2) + math.exp(-1))
    row0 = -(0.7310585786 * (2 - lse) + 0.2689414214 * (-1 - lse))
    assert math.isclose(hand_soft_ce(STUDENT[:1], TEACHER[:1], 1.0), row0, rel_tol=1e-8)
    for temperature in (1.0, 2.0, 4.0):
        got = soft_cross_entropy(s, t, temperature).item()
        assert got == pytest.approx(hand_soft_ce(STUDENT, TEACHER, temperature), rel=1e-5)


def test_kl_is_soft_ce_minus_teacher_entropy_and_zero_at_the_teacher():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    for temperature in (1.0, 3.0):
        expected = hand_soft_ce(STUDENT, TEACHER, temperature) - temperature ** 2 * hand_entropy(TEACHER, temperature)
        assert kl_divergence(s, t, temperature).item() == pytest.approx(expected, rel=1e-5)
        assert abs(kl_divergence(t, t, temperature).item()) < 1e-6
        # the cross-entropy at the teacher is the teacher's entropy (times T^2), not 0
        ce_self = soft_cross_entropy(t, t, temperature).item()
        assert ce_self == pytest.approx(temperature ** 2 * hand_entropy(TEACHER, temperature), rel=1e-5)


def test_temperature_scaling_keeps_the_gradient_scale():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    # T^2 x the T=1 loss of the logits divided by T
    assert soft_cross_entropy(s, t, 2.5).item() == pytest.approx(6.25 * soft_cross_entropy(s / 2.5, t / 2.5).item())
    # Hinton et al.: at high T the gradient of T^2 * KL tends to (z_s - z_t) / (classes * batch), whatever T
    grads = []
    for temperature in (20.0, 40.0):
        z = s.clone().requires_grad_(True)
        kl_divergence(z, t, temperature).backward()
        grads.append(z.grad)
    hinton = ((s - s.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))) / (2 * len(s))
    for g in grads:
        assert torch.allclose(g, hinton, rtol=0.05, atol=1e-3)


def test_distillation_loss_total_by_hand():
    s = torch.tensor(STUDENT, requires_grad=True)
    t = torch.tensor(TEACHER, requires_grad=True)
    fs = torch.tensor([[0.2, -1.5, 3.0], [0.0, 0.5, -0.25]], requires_grad=True)
    ft = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    # SmoothL1, beta 1: |d| < 1 -> d^2 / 2, else |d| - 1/2; d = (0.2, -1.5, 2.0, -1.0, 0.5, -0.25)
    smooth = (0.02 + 1.0 + 1.5 + 0.5 + 0.125 + 0.03125) / 6
    # hard CE: -log softmax(row)[label]
    hard = -(math.log(softmax(STUDENT[0])[0]) + math.log(softmax(STUDENT[1])[1]) + math.log(softmax(STUDENT[2])[1])) / 3
    soft = hand_soft_ce(STUDENT, TEACHER, 2.0)
    loss = DistillationLoss(temperature=2.0, soft_weight=0.1, feature_weight=1.0, hard_weight=0.5)
    out = loss(s, t, fs, ft, labels)
    assert set(out) == {"loss", "soft", "feature", "hard"}
    assert out["feature"].item() == pytest.approx(smooth, rel=1e-6)
    assert out["hard"].item() == pytest.approx(hard, rel=1e-6)
    assert out["soft"].item() == pytest.approx(soft, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.1 * soft + smooth + 0.5 * hard, rel=1e-5)
    assert all(not out[k].requires_grad for k in ("soft", "feature", "hard"))
    out["loss"].backward()
    assert s.grad.abs().sum() > 0 and fs.grad.abs().sum() > 0 and t.grad is None  # the teacher is a target
    # the EAGLE default (feature + 0.1 soft CE) reports no hard term
    assert set(DistillationLoss()(s, t, fs, ft)) == {"loss", "soft", "feature"}
    kl = DistillationLoss(soft="kl", feature_weight=0.0)(t, t)
    assert set(kl) == {"loss", "soft"} and abs(kl["loss"].item()) < 1e-7


def test_distillation_loss_errors():
    s, t, f = torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 8)
    with pytest.raises(ValueError, match="FeatureProjection"):
        DistillationLoss()(s, t, torch.zeros(3, 4), f)
    with pytest.raises(ValueError, match="teacher_features"):
        DistillationLoss()(s, t, f)
    with pytest.raises(ValueError, match="teacher_logits"):
        DistillationLoss()(s, None, f, f)
    with pytest.raises(ValueError, match="labels"):
        DistillationLoss(hard_weight=1.0)(s, t, f, f)
    with pytest.raises(ValueError, match="shape"):
        soft_cross_entropy(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="soft="):
        DistillationLoss(soft="mse")
    with pytest.raises(ValueError, match="weights"):
        DistillationLoss(soft_weight=0, feature_weight=0)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0)


def test_feature_projection():
    proj = FeatureProjection(192, 384)
    assert proj(torch.zeros(5, 192)).shape == (5, 384)
    assert torch.equal(proj.proj.bias, torch.zeros(384))
    assert isinstance(FeatureProjection(64, 64).proj, nn.Linear)  # no identity shortcut


# --- elastic ViT --------------------------------------------------------------------------------------

VIT_VARIANTS = {
    "cls_token": {},
    "avg_pool": {"global_pool": "avg"},
    "avg_no_cls": {"global_pool": "avg", "class_token": False},
    "registers": {"reg_tokens": 2, "no_embed_class": True},
}


@pytest.mark.parametrize("compress", ["prune", "pool"])
@pytest.mark.parametrize("variant", list(VIT_VARIANTS))
def test_full_budget_is_the_wrapped_vit(variant, compress):
    vit = tiny_vit(**VIT_VARIANTS[variant])
    x = images(4)
    with torch.no_grad():
        expected = vit(x)
        fixed = ElasticViT(vit, compress=compress, selector="fixed", fixed_budget=1.0).eval()(x)
        gate = ElasticViT(vit, compress=compress, selector="gate").eval()
        gate.gate.fc2.bias.data = torch.tensor([0.0, 0.0, 1.0])  # the gate picks budget 1.0
        gated = gate(x)
    assert (fixed.logits - expected).abs().max() <= 1e-5
    assert (gated.logits - expected).abs().max() <= 1e-5
    assert gated.budget_index.tolist() == [2] * 4 and gated.expected_budget.item() == 1.0
    assert fixed.features.shape == (4, vit.num_features) and torch.allclose(vit.head(fixed.features), fixed.logits)
    trained = ElasticViT(vit, compress=compress, selector="fixed").train()  # no dropout here: still the same function
    loss = trained(x).logits.square().sum()
    assert (loss - vit.train()(x).square().sum()).abs() <= 1e-4
    loss.backward()
    if compress == "prune":  # the straight-through score learns even when every token is kept
        assert trained.importance.linear.weight.grad.abs().sum() > 0


def test_prune_keeps_the_top_patches_in_order():
    budgets = (0.1, 0.3, 0.7, 1.0)
    model = ElasticViT(tiny_vit(), budgets=budgets, selector="fixed").eval()
    n, p = 64, model.num_prefix_tokens
    assert model.counts.tolist() == [7, 20, 45, 64]  # ceil(6.4), ceil(19.2), ceil(44.8), 64
    tokens = torch.arange(p + n, dtype=torch.float32)[None, :, None].repeat(3, 1, 4)  # each token holds its position
    scores = torch.randn(3, n)
    scores[0, :] = 1.0  # all tied: the earliest patches win
    for b, k in enumerate(model.counts.tolist()):
        kept = model._compress(tokens, scores, k, 0)
        assert kept.shape == (3, p + k, 4)
        assert kept[:, :p, 0].tolist() == [list(range(p))] * 3  # the class token is always kept
        for row in range(3):
            expected = sorted(sorted(range(n), key=lambda i: (-scores[row, i].item(), i))[:k])
            assert (kept[row, p:, 0] - p).long().tolist() == expected
    lengths = sequence_lengths(model)
    for b, budget in enumerate(budgets):
        model.fixed_index = b
        with torch.no_grad():
            out = model(images(2))
        assert lengths[-1] == p + math.ceil(budget * n - 1e-9)
        assert model.token_counts(out.budget_index).tolist() == [model.counts[b].item()] * 2
        assert out.expected_budget.item() == pytest.approx(model.counts[b].item() / n)


def test_pool_token_counts_and_position_embeddings():
    assert [pool_kernel(b) for b in (1.0, 0.5, 0.25, 0.125, 1 / 3)] == [(1, 1), (2, 1), (2, 2), (4, 2), (3, 1)]
    model = ElasticViT(tiny_vit(), budgets=(0.125, 0.25, 0.5, 1.0), compress="pool", selector="fixed").eval()
    assert model.counts.tolist() == [8, 16, 32, 64]
    odd = ElasticViT(tiny_vit(img_size=56), compress="pool", selector="fixed")  # a 7x7 grid: edge cells are partial
    assert odd.counts.tolist() == [16, 28, 49]  # ceil(7/2)^2, ceil(7/2)*7, 49
    # pooled tokens = the average of (patch embedding + position embedding) over each window
    vit = model.vit
    x = images(2)
    with torch.no_grad():
        tokens = vit._pos_embed(vit.patch_embed(x))
        grid = tokens[:, 1:].transpose(1, 2).reshape(2, -1, 8, 8)
        for b, kernel in enumerate([(4, 2), (2, 2), (2, 1)]):
            pooled = model._compress(tokens, None, model._counts[b], model._offsets[b])
            expected = F.avg_pool2d(grid, kernel).flatten(2).transpose(1, 2)
            assert torch.allclose(pooled[:, 1:], expected, atol=1e-6) and torch.equal(pooled[:, :1], tokens[:, :1])
    lengths = sequence_lengths(odd)
    for b in range(3):
        odd.fixed_index = b
        with torch.no_grad():
            odd.eval()(images(1, size=56))
        assert lengths[-1] == 1 + odd.counts[b].item()


def test_unsupported_models_and_settings():
    with pytest.raises(ValueError, match="timm VisionTransformer"):
        ElasticViT(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="global_pool"):
        ElasticViT(tiny_vit(global_pool="map"))
    vit = tiny_vit()
    for kwargs, match in [({"budgets": (0.5, 0.25)}, "increasing"), ({"budgets": (0.0, 1.0)}, "increasing"),
                          ({"compress": "merge"}, "compress"), ({"selector": "random"}, "selector"),
                          ({"compress": "pool", "budgets": (0.5, 0.6)}, "1/integer"),
                          ({"selector": "fixed", "fixed_budget": 0.3}, "fixed_budget"),
                          ({"selector": "entropy", "thresholds": (2.0,)}, "thresholds")]:
        with pytest.raises(ValueError, match=match):
            ElasticViT(vit, **kwargs)
    with pytest.raises(RuntimeError, match="fit_thresholds"):
        ElasticViT(vit, selector="entropy").eval()(images(1))


@pytest.mark.parametrize("train_all_budgets", [True, False])
def test_gate_gets_a_gradient_through_the_gumbel_choice(train_all_budgets):
    model = ElasticViT(tiny_vit(), train_all_budgets=train_all_budgets).train()
    torch.manual_seed(1)
    out = model(images(6))
    assert out.gate_logits.shape == (6, 3) and out.budget_index.shape == (6,)
    F.cross_entropy(out.logits, torch.tensor([0, 1] * 3)).backward()  # no cost term: the gradient is the mixing's
    assert model.gate.fc2.weight.grad.abs().sum() > 0
    assert model.importance.linear.weight.grad.abs().sum() > 0  # the straight-through score
    assert model.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_cost_term_moves_the_gate_to_the_smallest_budget():
    model = ElasticViT(tiny_vit(), train_all_budgets=False).train()
    optimizer = torch.optim.Adam(model.gate.parameters(), lr=0.05)
    x = images(4)
    start = None
    for _ in range(15):
        out = model(x)
        start = out.expected_budget.item() if start is None else start
        optimizer.zero_grad()
        out.expected_budget.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert start == pytest.approx((16 + 32 + 64) / 3 / 64, rel=1e-5)  # the uniform gate at initialisation
    assert out.budget_index.tolist() == [0] * 4
    assert out.gate_logits.softmax(-1)[:, 0].min() > 0.9


def test_eval_groups_give_the_logits_of_single_images():
    for compress in ("prune", "pool"):
        model = random_gate(ElasticViT(tiny_vit(), compress=compress)).eval()
        x = images(12)
        with torch.no_grad():
            batch = model(x)
            alone = torch.cat([model(x[i:i + 1]).logits for i in range(len(x))])
        assert len(set(batch.budget_index.tolist())) == 3  # every budget is used
        assert (batch.logits - alone).abs().max() <= 1e-5
        assert torch.equal(model.classify(x), batch.logits)
        expected = model.token_counts(batch.budget_index).float().mean() / 64
        assert batch.expected_budget.item() == pytest.approx(expected.item())


def test_a_gate_model_can_be_forced_to_one_budget():
    model = random_gate(ElasticViT(tiny_vit())).train()
    model.selector, model.fixed_index = "fixed", 1  # how each budget is evaluated
    out = model(images(4))
    assert out.budget_index.tolist() == [1] * 4 and out.gate_logits is None
    assert out.expected_budget.item() == 0.5


def test_entropy_selector_fits_thresholds_to_shares():
    model = ElasticViT(tiny_vit(), selector="entropy", mean=MEAN, std=STD).eval()
    x = images(40, seed=3)
    thresholds = model.fit_thresholds(x, shares=(0.5, 0.25, 0.25))
    complexity = model.complexity(x)
    assert thresholds.tolist() == sorted(thresholds.tolist())
    assert torch.allclose(thresholds, torch.quantile(complexity, torch.tensor([0.5, 0.75])))
    with torch.no_grad():
        index = model(x).budget_index
    assert np.bincount(index.numpy(), minlength=3).tolist() == pytest.approx([20, 10, 10], abs=1)
    assert torch.equal(index, (complexity[:, None] >= thresholds).sum(1))
    assert model.state_dict()["thresholds"].tolist() == thresholds.tolist()  # saved with the weights
    flat = torch.zeros(1, 3, 64, 64)
    assert model.select(flat).item() == 0  # a flat image has entropy 0: the smallest budget


def test_factory_builds_from_backbone_arguments():
    model = elastic_vit({"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1},
                        budgets=(0.5, 1.0), selector="fixed")
    assert model.num_features == model.embed_dim == 192 and model.counts.tolist() == [8, 16]
    assert model.backbone_args["name"] == "vit_tiny_patch16_224"
    assert model.elastic_args["budgets"] == [0.5, 1.0]


# --- ONNX ---------------------------------------------------------------------------------------------

def export_and_compare(model: ElasticViT, x: torch.Tensor, path, dynamo: bool, opset: int) -> float:
    """Export the batch-1 graph, then max |P_torch - P_onnxruntime| over the images of ``x`` one at a time."""
    import onnx
    import onnxruntime as ort

    graph = model.export_module()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (x[:1],), str(path), dynamo=dynamo, opset_version=opset, verbose=False,
                          input_names=["pixel_values"], output_names=["logits"], external_data=False)
        expected = model(x).logits.softmax(-1).numpy()
    assert onnx.load(str(path)).opset_import[0].version == opset
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"pixel_values": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    return float(np.abs(expected - torch.from_numpy(got).softmax(-1).numpy()).max())


def gate_examples(model: ElasticViT) -> torch.Tensor:
    """Two images per budget the gate picks."""
    x = images(24)
    with torch.no_grad():
        index = model.eval()(x).budget_index
    chosen = torch.cat([(index == b).nonzero().squeeze(1)[:2] for b in range(len(model.budgets))])
    assert len(chosen) == 2 * len(model.budgets), f"the gate's picks: {index.tolist()}"
    return x[chosen]


def test_onnx_prune_gate_parity_opset17(tmp_path):
    """The TorchScript exporter at opset 17: the gate's argmax picks k inside the graph (data-dependent TopK)."""
    model = random_gate(ElasticViT(tiny_vit()), seed=2)
    assert export_and_compare(model, gate_examples(model), tmp_path / "draft.onnx", dynamo=False, opset=17) <= 1e-4


def test_onnx_breaks_importance_ties_like_pytorch(tmp_path):
    """Flat images: most patches share one score, and the cut at k falls among equals (the earlier patch wins)."""
    model = ElasticViT(tiny_vit(), selector="fixed", fixed_budget=0.25)
    flat = torch.zeros(2, 3, 64, 64)
    flat[0, :, 8:24, 40:56] = 1.0
    flat[1, :, 40:, :] = -1.0
    scores = model.importance(model.vit.patch_embed(flat))
    assert len(scores[0].unique()) <= 3 and len(scores[1].unique()) <= 3
    assert export_and_compare(model, flat, tmp_path / "draft.onnx", dynamo=False, opset=17) <= 1e-4


def test_onnx_dynamo_exporter_parity(tmp_path):
    """The dynamo exporter (as train/export/onnx.py uses it, opset 18); here pool + entropy, the other pair."""
    model = ElasticViT(tiny_vit(), compress="pool", selector="entropy")
    x = images(8, seed=5)
    model.fit_thresholds(x)
    assert export_and_compare(model, x, tmp_path / "draft.onnx", dynamo=True, opset=18) <= 1e-4


def test_export_graph_is_batch_one():
    graph = ElasticViT(tiny_vit()).export_module()
    assert not graph.model.training
    with pytest.raises(ValueError, match="one image at a time"):
        graph(images(2))


def test_teacher_precision_is_a_choice_and_auto_says_what_ran():
    """``bf16`` and ``fp32`` run as named on any CPU; ``auto`` resolves to bf16 only where the CPU has it natively, and
    the resolved name is what the autocast does. Either way the teacher's targets come back as float32 close to the
    float32 teacher's."""
    from train.utils.precision import native_bf16, precision_autocast, resolve_precision

    x, w = torch.randn(4, 16), torch.randn(16, 16)
    assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    for precision in ("auto", "bf16", "fp32"):
        with precision_autocast("cpu", precision):
            ran = {torch.bfloat16: "bf16", torch.float32: "fp32"}[(x @ w).dtype]
        assert ran == resolve_precision(precision, "cpu")
    with pytest.raises(ValueError, match="'fp16'; allowed"):
        resolve_precision("fp16", "cpu")

    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                                num_classes=2).eval()
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        exact = teacher(images)
        with precision_autocast("cpu", "bf16"):
            fast = teacher(images).float()
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, exact, atol=0.1) and (fast.argmax(1) == exact.argmax(1)).float().mean() >= 0.75


def test_teacher_memo_runs_the_teacher_once_per_input():
    """The memo hands back exactly what the teacher computes, and runs it only on inputs it has not seen: a new
    sample, another augmentation (a flip) of a known one; a sample twice in one batch runs once; rows survive the
    memo's growth."""
    from train.models.distill import TeacherMemo

    weights = torch.randn(48, 5)
    seen = []

    def teacher(x: torch.Tensor):
        seen.append(len(x))
        return x.flatten(1) @ weights, x.flatten(1)[:, :3] * 2

    memo, images, index = TeacherMemo(), torch.randn(6, 3, 4, 4), torch.arange(6)
    memo(index[:4], images[:4], teacher)
    logits, features = memo(index, images, teacher)
    assert seen == [4, 2] and len(memo) == 6
    exact = teacher(images)
    assert torch.allclose(logits, exact[0], atol=1e-5) and torch.equal(features, exact[1])
    seen.clear()
    memo(index, images, teacher)
    memo(index[:1], images[:1].flip(-1), teacher)
    memo(torch.tensor([9, 9]), torch.stack([images[5], images[5]]), teacher)
    assert seen == [1, 1] and len(memo) == 8
    many = torch.randn(300, 3, 4, 4)
    memo(torch.arange(100, 400), many, teacher)
    again = memo(index, images, teacher)
    assert len(memo) == 308 and torch.equal(again[1], features)


def test_draft_module_remembers_its_teachers_outputs(tmp_path):
    """Validation queries come back every epoch: the teacher runs on them once. Training inputs are remembered only
    with ``remember_train`` (a sampler that repeats augmentation draws)."""
    from functools import partial

    from train.models.backbones import create_backbone
    from train.models.saving import save_classifier
    from train.tiers.draft import DraftModule

    args = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
    save_classifier(create_backbone(**args), tmp_path / "teacher", {"img_size": 32, "mean": [0.5] * 3,
                                                                    "std": [0.25] * 3})
    batch = {"image": torch.randn(8, 3, 32, 32), "label": torch.randint(0, 2, (8,)), "index": torch.arange(8)}
    for remember in (False, True):
        module = DraftModule(str(tmp_path / "teacher"), {**args, "depth": 1}, partial(torch.optim.AdamW, lr=1e-3),
                             remember_train=remember, val_levels=[0])
        calls = []
        teach = module.teach
        module.teach = lambda images: calls.append(len(images)) or teach(images)
        for _ in range(2):
            module.training_step(batch, 0)
        assert calls == ([8] if remember else [8, 8])
        calls.clear()
        for _ in range(3):
            module.validation_step(batch, 0)
        assert calls == [8]


# --- the default job's draft ----------------------------------------------------------------------------

def test_the_default_jobs_draft_starts_from_stage1_at_a_seventh_of_its_flops():
    """conf/sizes/cpu.yaml's draft keeps Stage-1's width, so its embeddings and first two blocks are Stage-1's, and
    its 2 x 2-pooled tokens cost about 0.15x Stage-1's FLOPs."""
    from omegaconf import OmegaConf

    from conftest import compose_config
    from train.export.flops import count_flops
    from train.models.backbones import create_backbone
    from train.models.draft import build_student, draft_classifier, init_from_teacher

    cfg = OmegaConf.to_container(compose_config(), resolve=True)
    torch.manual_seed(0)
    teacher = create_backbone(**{**cfg["model"]["backbone"], "pretrained": False}).eval()
    student = build_student(cfg["draft"]["module"]["student"], cfg["draft"]["module"]["elastic"])
    copied = init_from_teacher(student, teacher)
    theirs = teacher.state_dict()
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc2.weight", "norm.weight"} <= set(copied)
    assert not any(name.startswith("blocks.2") for name in copied)
    draft = draft_classifier(student).eval()
    body = draft.elastic.vit.state_dict()
    assert all(torch.equal(body[name], theirs[name]) for name in copied)
    x = images(4, size=cfg["model"]["img_size"])
    ratio = count_flops(draft, x) / count_flops(teacher, x)
    assert 0.12 < ratio < 0.18, ratio
