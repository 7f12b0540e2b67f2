"""Reports: the paper's published numbers, comparison tables, the papermill runner."""
