# The MLflow tracking server image used by k8s/base/mlflow.yaml: the official image (same MLflow as
# pyproject.toml pins) plus the drivers its backend and artifact stores need, which it does not ship:
# psycopg2 for PostgreSQL (tracking and auth tables), boto3 for S3 and Flask-WTF for the basic-auth
# app (= mlflow[auth]); and k8s/mlflow_users.py, which the mlflow-users Job runs to create clipflow's
# MLflow identities. Build and push it next to the project image:
#   docker build -f k8s/mlflow.Dockerfile -t ghcr.io/clipflow/mlflow:3.17.2 k8s && docker push ghcr.io/clipflow/mlflow:3.17.2
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2" "Flask-WTF<2"
COPY mlflow_users.py /opt/clipflow/mlflow_users.py
# Runs as an unprivileged user (the Deployment also enforces it); no files of its own to write but /tmp.
USER 1000:1000
