"""Every public function and class of the package has a docstring (the API reference is built from them), and every
field of the export manifest a meaning. A method that implements a documented hook of its base (Lightning's steps and
hooks, torch's ``forward``, a Tier's hooks, a Dataset's protocol) is documented there."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "train"
HOOKS = {  # documented by the base class that calls them
    "forward", "training_step", "validation_step", "test_step", "predict_step", "configure_optimizers",
    "configure_gradient_clipping", "setup", "teardown", "prepare_data", "train_dataloader", "val_dataloader",
    "test_dataloader", "predict_dataloader", "transfer_batch_to_device", "state_dict", "load_state_dict",
    "needs", "settings", "selection", "trainer_overrides", "inputs", "module", "loaders", "fit", "finish", "load",
    "export", "model_post_init", "extra_repr",
}


def undocumented() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = path.relative_to(PACKAGE.parent)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            if not ast.get_docstring(node):
                out.append(f"{where}:{node.lineno} {node.name}")
            if isinstance(node, ast.ClassDef):
                out += [f"{where}:{m.lineno} {node.name}.{m.name}" for m in node.body
                        if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith("_")
                        and not m.name.startswith("on_") and m.name not in HOOKS and not ast.get_docstring(m)]
    return out


def test_every_public_function_and_class_has_a_docstring():
    missing = undocumented()
    assert not missing, f"{len(missing)} without a docstring:\n" + "\n".join(missing)


def test_every_manifest_field_has_a_meaning_in_the_schema():
    """The manifest reference and ``manifest.schema.json`` give each field's meaning (its attribute docstring)."""
    from train.export.manifest import Manifest, ModelCard

    missing = []
    for schema in (Manifest.model_json_schema(), ModelCard.model_json_schema()):
        for record in [schema, *schema.get("$defs", {}).values()]:
            missing += [f"{record['title']}.{name}" for name, field in record["properties"].items()
                        if len(field.get("description", "")) < 10]
    assert not missing, f"manifest fields without a meaning: {missing}"
