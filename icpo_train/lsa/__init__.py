"""The toy theory: a one-layer linear self-attention model pretrained to imitate a policy-optimisation
algorithm on linear bandits (``icpo-train lsa``)."""
