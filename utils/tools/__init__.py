"""Command-line tools run as modules (python -m utils.tools.NAME); they sit beside the top-level scripts."""
