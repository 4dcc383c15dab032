"""HiPA: a one-step, low-rank adaptor trained against the multi-step teacher (spatial + high-frequency losses)."""

from studio.adapters.hipa.model import HipaMethod  # noqa: F401  (registers the method)
