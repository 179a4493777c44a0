"""Scoring: which instances are eligible (header only), the intended use (its header checks and the
not-assessed codes), one file to model input, the model runner.

``eligibility``, ``intended_use`` and ``prepare`` import neither torch nor the database: the decode
processes import ``prepare`` alone. ``runner`` holds the loaded model and its detector.
"""
