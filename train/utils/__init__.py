"""Small helpers: logging set-up, config printing, metric tables, random state, the ranks of multi-process runs."""
