"""Evaluation: settings, scoring, option log-likelihood, generation and the runner.

Deliberately empty of imports: the command line reads `comoe.evaluation.settings` without loading torch.
Import `comoe.evaluation.runner.run_eval` to evaluate from Python.
"""
