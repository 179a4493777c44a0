"""Durable state: the database (schema, engine, states), the study lifecycle, outbox rows, the spool.

Every arrow of a study's journey is a committed state here, so a restart resumes where it stopped.
"""
