"""The chat side: the generation engine, batched LoRA adapters, the Ray Serve deployment.

Importing it changes nothing in the process: what a chat replica on one machine needs in its
environment (``OMP_WAIT_POLICY``) the embedded launcher gives it (``service.ray.embedded``)."""
