"""The episodic memory: pure selection policies and the sharded Ray actor service."""
