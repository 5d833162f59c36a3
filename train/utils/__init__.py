"""Small helpers: logging set-up, config printing, metric tables."""
