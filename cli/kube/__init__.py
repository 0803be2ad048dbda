"""Kubernetes clusters as targets: mlserve builds, pushes, renders and applies objects, and reads their
state back; Kubernetes places, restarts and probes (no scheduler or node agent of mlserve's own)."""
