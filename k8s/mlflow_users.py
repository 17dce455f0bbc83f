"""Create clipflow's MLflow identities on a `mlflow server --app-name basic-auth` (idempotent; rerun to rotate).

MLflow's basic-auth app keeps users and grants in its database and has no declarative config for them, so
the Job `mlflow-users` (k8s/base/mlflow.yaml) runs this with the admin's credentials after each apply:

- ``clipflow-train`` (RayJobs of `clipflow train`): EDIT on every experiment and registered model: it opens
  runs, logs metrics and artifacts, registers versions, also in experiments and models another identity
  created. (MLflow makes a creator the manager of what it creates, so it may delete its own.)
- ``clipflow-eval`` (`clipflow eval`): EDIT on registered models (claims, eval_status tags, aliases) and on
  logged models (the eval results are metrics on the version's logged model); it creates its own
  ``<experiment>-eval`` experiment (MLflow makes the creator its manager) and reads the training runs through
  ``default_permission = READ``, so it cannot rewrite a training run's metrics.

Both are roles of MLflow's ``default`` workspace (the one every resource lives in while workspaces are off),
granted on the wildcard ``*`` so models registered later are covered too. Environment: the admin's
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (MLflow's client reads them), ``MLFLOW_TRACKING_URI``,
and ``CLIPFLOW_<IDENTITY>_USERNAME``/``_PASSWORD`` for each identity below. Passwords come from Secrets,
never from argv. The MLflow server image ships this file (k8s/mlflow.Dockerfile).
"""

from __future__ import annotations

import os
import sys

from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient

WORKSPACE = "default"  # where grants live while MLflow workspaces are disabled (mlflow.utils.workspace_utils)
# identity -> (role name, [(resource type, permission)]), each granted on every resource ("*").
IDENTITIES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "TRAIN": ("clipflow-train", [("experiment", "EDIT"), ("registered_model", "EDIT")]),
    "EVAL": ("clipflow-eval", [("registered_model", "EDIT"), ("logged_model", "EDIT")]),
}


def credentials(identity: str) -> tuple[str, str]:
    """The identity's username and password from the environment (a Secret), or exit with what to set."""
    names = [f"CLIPFLOW_{identity}_USERNAME", f"CLIPFLOW_{identity}_PASSWORD"]
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        sys.exit(f"mlflow_users: set {', '.join(missing)} (from the identity's Secret; see k8s/secrets/)")
    return os.environ[names[0]], os.environ[names[1]]


def ensure_user(client: AuthServiceClient, username: str, password: str) -> None:
    """Create the user, or set its password when it exists (so a rotated Secret takes effect)."""
    try:
        client.create_user(username, password)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.update_user_password(username, password)


def ensure_role(client: AuthServiceClient, name: str, grants: list[tuple[str, str]]) -> int:
    """The role's id, created with exactly ``grants`` on ``*`` (grants it holds beyond them are removed)."""
    role = next((r for r in client.list_roles(WORKSPACE) if r.name == name), None)
    if role is None:
        role = client.create_role(WORKSPACE, name, description="clipflow workload identity (k8s/mlflow_users.py)")
    wanted = {(resource, "*"): permission for resource, permission in grants}
    for held in client.list_role_permissions(role.id):
        key = (held.resource_type, held.resource_pattern)
        if wanted.get(key) == held.permission:
            wanted.pop(key)
        else:
            client.remove_role_permission(held.id)
    for (resource, pattern), permission in wanted.items():
        client.add_role_permission(role.id, resource, pattern, permission)
    return role.id


def main() -> int:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        sys.exit("mlflow_users: set MLFLOW_TRACKING_URI to the MLflow server (e.g. http://mlflow:5000)")
    client = AuthServiceClient(uri)
    for identity, (role_name, grants) in IDENTITIES.items():
        username, password = credentials(identity)
        ensure_user(client, username, password)
        role_id = ensure_role(client, role_name, grants)
        if role_id not in {r.id for r in client.list_user_roles(username)}:
            client.assign_role(username, role_id)
        print(f"mlflow_users: {username}: role {role_name} ({', '.join(f'{p} on {r} *' for r, p in grants)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
