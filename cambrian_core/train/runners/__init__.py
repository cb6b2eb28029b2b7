"""Runners (``RUNNERS``): ``single``, ``fsdp``, ``deepspeed``, ``xla``; each module registers one."""
