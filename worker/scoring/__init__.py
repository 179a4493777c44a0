"""Scoring: which instances are eligible (header only), one file to model input, the model runner.

``eligibility`` and ``prepare`` import neither torch nor the database: the decode processes import
``prepare`` alone. ``runner`` holds the loaded model.
"""
