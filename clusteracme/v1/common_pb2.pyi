from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_TYPE_UNSPECIFIED: _ClassVar[KeyType]
    KEY_TYPE_EC_P256: _ClassVar[KeyType]
    KEY_TYPE_EC_P384: _ClassVar[KeyType]
    KEY_TYPE_RSA_2048: _ClassVar[KeyType]
    KEY_TYPE_RSA_3072: _ClassVar[KeyType]
    KEY_TYPE_RSA_4096: _ClassVar[KeyType]
KEY_TYPE_UNSPECIFIED: KeyType
KEY_TYPE_EC_P256: KeyType
KEY_TYPE_EC_P384: KeyType
KEY_TYPE_RSA_2048: KeyType
KEY_TYPE_RSA_3072: KeyType
KEY_TYPE_RSA_4096: KeyType

class Slot(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    def __init__(self, domain: _Optional[str] = ...) -> None: ...

class ChallengeToken(_message.Message):
    __slots__ = ("token", "key_authorization")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    KEY_AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    token: str
    key_authorization: str
    def __init__(self, token: _Optional[str] = ..., key_authorization: _Optional[str] = ...) -> None: ...

class CertificateSummary(_message.Message):
    __slots__ = ("subject", "sans", "issuer", "serial_hex", "not_before", "not_after", "key_type", "matches_peer_key", "key_check", "sha256_fingerprint")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SANS_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    MATCHES_PEER_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_CHECK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    subject: str
    sans: _containers.RepeatedScalarFieldContainer[str]
    issuer: str
    serial_hex: str
    not_before: str
    not_after: str
    key_type: str
    matches_peer_key: bool
    key_check: str
    sha256_fingerprint: str
    def __init__(self, subject: _Optional[str] = ..., sans: _Optional[_Iterable[str]] = ..., issuer: _Optional[str] = ..., serial_hex: _Optional[str] = ..., not_before: _Optional[str] = ..., not_after: _Optional[str] = ..., key_type: _Optional[str] = ..., matches_peer_key: _Optional[bool] = ..., key_check: _Optional[str] = ..., sha256_fingerprint: _Optional[str] = ...) -> None: ...

class ReloadResult(_message.Message):
    __slots__ = ("target", "ok", "detail", "seconds")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    target: str
    ok: bool
    detail: str
    seconds: float
    def __init__(self, target: _Optional[str] = ..., ok: _Optional[bool] = ..., detail: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class SlotCertificates(_message.Message):
    __slots__ = ("slot", "active_serial_hex", "active_not_after", "previous_serial_hex")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    slot: Slot
    active_serial_hex: str
    active_not_after: str
    previous_serial_hex: str
    def __init__(self, slot: _Optional[_Union[Slot, _Mapping]] = ..., active_serial_hex: _Optional[str] = ..., active_not_after: _Optional[str] = ..., previous_serial_hex: _Optional[str] = ...) -> None: ...

class CsrSubject(_message.Message):
    __slots__ = ("organization", "organizational_unit", "locality", "state", "country")
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATIONAL_UNIT_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    organization: str
    organizational_unit: str
    locality: str
    state: str
    country: str
    def __init__(self, organization: _Optional[str] = ..., organizational_unit: _Optional[str] = ..., locality: _Optional[str] = ..., state: _Optional[str] = ..., country: _Optional[str] = ...) -> None: ...
