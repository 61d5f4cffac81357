"""Runnable recipes with their command lines: training runs, demos and experiments built on minqwen."""
