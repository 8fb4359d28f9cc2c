-- The MLflow tracking server's own database beside Airflow's.
CREATE DATABASE mlflow;
