-- The MLflow database is created by POSTGRES_DB; Prefect gets its own, and MLflow's basic auth (users, grants) too.
CREATE DATABASE prefect;
CREATE DATABASE mlflow_auth;
