"""Guards: systems that refuse instead of generating (one file per guard; the contract is `base`)."""
