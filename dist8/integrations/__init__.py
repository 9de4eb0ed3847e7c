"""Integrations with training frameworks (import the submodule you need: ``dist8.integrations.fsdp``)."""
