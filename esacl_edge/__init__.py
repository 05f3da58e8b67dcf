"""esacl-edge: on-device continual learning of sparse models (EsaCL: SDP + IDS)."""

__version__ = "0.3.0"

from .device.profiles import Profile, load_profile  # noqa: E402
from .errors import EsaclError  # noqa: E402
from .learn.learner import StreamingLearner  # noqa: E402

__all__ = ["StreamingLearner", "Profile", "load_profile", "EsaclError", "__version__"]
