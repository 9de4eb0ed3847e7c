"""Integrations with training frameworks (import the submodule you need: ``dist8.integrations.fsdp``,
``dist8.integrations.deepspeed``, ``dist8.integrations.hf_trainer``, ``dist8.integrations.lightning``)."""
