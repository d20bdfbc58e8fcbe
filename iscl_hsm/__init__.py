"""iscl-hsm: ISCL V1.00 secure DICOM transport with keys held in a PKCS#11 token or an IC card."""

from .engine import Config, Connection, Profile, Role
from .errors import ErrorCode, IsclError, KeyHolderError, LocalProtocolError, RemoteProtocolError
from .wire import Encryption, Mac, Md5Order

__version__ = "0.1.0"

__all__ = [
    "Config", "Connection", "Encryption", "ErrorCode", "IsclError", "KeyHolderError",
    "LocalProtocolError", "Mac", "Md5Order", "Profile", "RemoteProtocolError", "Role", "__version__",
]
