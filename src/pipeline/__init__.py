"""MovieLens recommender pipeline: every stage as a plain function (no Airflow import here)."""

__version__ = "0.1.0"
