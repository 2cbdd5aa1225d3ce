"""splitserve control plane: InferencePool CRD, reconciler and autoscaler."""
