"""The Ray Serve application: the ``Api`` ingress and one ``Chat-<slug>`` deployment per base model.

Import path for ``serve run`` / KubeRay's ``serveConfigV2``: ``service.ray.app:build_app``.
Its ``args`` are Settings fields (``{"storage": "s3://…"}``); unset fields come from
``TUNESERVE_*`` in the replica's environment. It tunes nothing for the machine it runs on: the
embedded launcher (``service.ray.embedded``) passes what one machine needs.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from service.core.names import base_model_ids, deployment_name
from service.core.settings import Settings

API_DEPLOYMENT = "Api"
SECRET_SETTINGS = {"api_keys", "webhook_secrets"}


def build_app(args: dict | None = None, *, chat_env: dict[str, str] | None = None) -> Application:
    """The application; ``chat_env``: environment variables of the chat replicas (the embedded
    launcher's; KubeRay passes only ``args``)."""
    from serving.deployment import ChatModel

    settings = Settings(**(args or {}))
    # API keys stay out of the deployments' arguments (Serve shows those in its status and
    # stores them in the cluster); replicas read TUNESERVE_API_KEYS from their environment.
    settings_args = settings.model_dump(mode="json", exclude=SECRET_SETTINGS)

    def build_api():
        # Evaluated on the replica, so the app (and its storage client) is made where it runs.
        from service.api.app import create_app
        from service.chat.backends import ServeChatBackend
        from service.core.logs import setup_logging
        from service.jobs.scheduler import RayJobRunner

        setup_logging()  # JSON lines, redacted; also where no setup hook ran (KubeRay)

        replica_settings = Settings(**settings_args)
        return create_app(replica_settings, chat=ServeChatBackend(replica_settings),
                          runner=RayJobRunner(replica_settings))

    # The API's requests wait on storage and on the chat deployment, not on this CPU: Serve's
    # default of 5 requests in flight per replica queued 50 pollers behind 8 chat streams.
    @serve.deployment(name=API_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=128)
    @serve.ingress(build_api)
    class Api:
        def __init__(self, *chat_deployments):
            # The chat deployments are looked up by name (ServeChatBackend); they are bound
            # here only so that they belong to this application and start with it.
            pass

    # Serve merges these variables into the runtime_env the replicas inherit from the driver
    # (whose worker setup hook stays).
    chat_options = {} if not chat_env else {"ray_actor_options": {
        **(ChatModel.ray_actor_options or {}), "runtime_env": {"env_vars": chat_env}}}
    chats = [
        ChatModel.options(name=deployment_name(base), **chat_options).bind(
            base_model=base, settings_args=settings_args)
        for base in base_model_ids(settings)
    ]
    # Binding the chat deployments as arguments makes them part of this application.
    return Api.bind(*chats)
