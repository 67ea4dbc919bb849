"""Shipped gate policies (YAML). Installed as the data package `guardtune_policies`; see guardtune.policy."""
