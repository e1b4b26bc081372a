"""Analysis of expert specialisation: metrics (imported by training), plots, reports and the pipeline.

Deliberately empty of imports: training imports `comoe.analysis.metrics` without matplotlib, and the
command line reads `comoe.analysis.settings` without torch.
"""
