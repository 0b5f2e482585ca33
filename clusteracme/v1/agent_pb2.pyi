from clusteracme.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PruneKeysRequest(_message.Message):
    __slots__ = ("keep", "retention_seconds", "dry_run")
    KEEP_FIELD_NUMBER: _ClassVar[int]
    RETENTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    keep: _containers.RepeatedScalarFieldContainer[str]
    retention_seconds: int
    dry_run: bool
    def __init__(self, keep: _Optional[_Iterable[str]] = ..., retention_seconds: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RetiredKey(_message.Message):
    __slots__ = ("slot", "public_key_sha256", "retired_at", "deleted_at")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    RETIRED_AT_FIELD_NUMBER: _ClassVar[int]
    DELETED_AT_FIELD_NUMBER: _ClassVar[int]
    slot: _common_pb2.Slot
    public_key_sha256: str
    retired_at: str
    deleted_at: str
    def __init__(self, slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., public_key_sha256: _Optional[str] = ..., retired_at: _Optional[str] = ..., deleted_at: _Optional[str] = ...) -> None: ...

class PruneKeysResponse(_message.Message):
    __slots__ = ("retired", "deleted")
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    retired: _containers.RepeatedCompositeFieldContainer[RetiredKey]
    deleted: _containers.RepeatedCompositeFieldContainer[RetiredKey]
    def __init__(self, retired: _Optional[_Iterable[_Union[RetiredKey, _Mapping]]] = ..., deleted: _Optional[_Iterable[_Union[RetiredKey, _Mapping]]] = ...) -> None: ...

class SignRevocationRequest(_message.Message):
    __slots__ = ("certificate_der", "reason", "nonce", "url")
    CERTIFICATE_DER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    certificate_der: bytes
    reason: int
    nonce: str
    url: str
    def __init__(self, certificate_der: _Optional[bytes] = ..., reason: _Optional[int] = ..., nonce: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class SignRevocationResponse(_message.Message):
    __slots__ = ("jws_json",)
    JWS_JSON_FIELD_NUMBER: _ClassVar[int]
    jws_json: str
    def __init__(self, jws_json: _Optional[str] = ...) -> None: ...

class SetTrustBundleRequest(_message.Message):
    __slots__ = ("bundle_pem", "sha256")
    BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    bundle_pem: str
    sha256: str
    def __init__(self, bundle_pem: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class SetTrustBundleResponse(_message.Message):
    __slots__ = ("written_to",)
    WRITTEN_TO_FIELD_NUMBER: _ClassVar[int]
    written_to: str
    def __init__(self, written_to: _Optional[str] = ...) -> None: ...

class AgentDeployRequest(_message.Message):
    __slots__ = ("slot", "chain_pem", "expected_names", "leader_fence")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_NAMES_FIELD_NUMBER: _ClassVar[int]
    LEADER_FENCE_FIELD_NUMBER: _ClassVar[int]
    slot: _common_pb2.Slot
    chain_pem: str
    expected_names: _containers.RepeatedScalarFieldContainer[str]
    leader_fence: int
    def __init__(self, slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., chain_pem: _Optional[str] = ..., expected_names: _Optional[_Iterable[str]] = ..., leader_fence: _Optional[int] = ...) -> None: ...

class AgentRollbackRequest(_message.Message):
    __slots__ = ("slot", "expected_active_serial_hex", "leader_fence")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACTIVE_SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    LEADER_FENCE_FIELD_NUMBER: _ClassVar[int]
    slot: _common_pb2.Slot
    expected_active_serial_hex: str
    leader_fence: int
    def __init__(self, slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., expected_active_serial_hex: _Optional[str] = ..., leader_fence: _Optional[int] = ...) -> None: ...

class AgentDeployResponse(_message.Message):
    __slots__ = ("active_serial_hex", "previous_serial_hex", "reloads")
    ACTIVE_SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    active_serial_hex: str
    previous_serial_hex: str
    reloads: _containers.RepeatedCompositeFieldContainer[_common_pb2.ReloadResult]
    def __init__(self, active_serial_hex: _Optional[str] = ..., previous_serial_hex: _Optional[str] = ..., reloads: _Optional[_Iterable[_Union[_common_pb2.ReloadResult, _Mapping]]] = ...) -> None: ...

class OrderTokens(_message.Message):
    __slots__ = ("order_id", "tokens")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    tokens: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChallengeToken]
    def __init__(self, order_id: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[_common_pb2.ChallengeToken, _Mapping]]] = ...) -> None: ...

class PresentTokensRequest(_message.Message):
    __slots__ = ("order_id", "tokens", "ttl_seconds", "orders")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ORDERS_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    tokens: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChallengeToken]
    ttl_seconds: int
    orders: _containers.RepeatedCompositeFieldContainer[OrderTokens]
    def __init__(self, order_id: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[_common_pb2.ChallengeToken, _Mapping]]] = ..., ttl_seconds: _Optional[int] = ..., orders: _Optional[_Iterable[_Union[OrderTokens, _Mapping]]] = ...) -> None: ...

class PresentTokensResponse(_message.Message):
    __slots__ = ("open_tokens",)
    OPEN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    open_tokens: int
    def __init__(self, open_tokens: _Optional[int] = ...) -> None: ...

class RemoveTokensRequest(_message.Message):
    __slots__ = ("order_id", "tokens", "order_ids")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ORDER_IDS_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    tokens: _containers.RepeatedScalarFieldContainer[str]
    order_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, order_id: _Optional[str] = ..., tokens: _Optional[_Iterable[str]] = ..., order_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RemoveTokensResponse(_message.Message):
    __slots__ = ("open_tokens",)
    OPEN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    open_tokens: int
    def __init__(self, open_tokens: _Optional[int] = ...) -> None: ...

class GenerateCSRRequest(_message.Message):
    __slots__ = ("slot", "common_name", "sans", "key_type", "subject")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    COMMON_NAME_FIELD_NUMBER: _ClassVar[int]
    SANS_FIELD_NUMBER: _ClassVar[int]
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    slot: _common_pb2.Slot
    common_name: str
    sans: _containers.RepeatedScalarFieldContainer[str]
    key_type: _common_pb2.KeyType
    subject: _common_pb2.CsrSubject
    def __init__(self, slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., common_name: _Optional[str] = ..., sans: _Optional[_Iterable[str]] = ..., key_type: _Optional[_Union[_common_pb2.KeyType, str]] = ..., subject: _Optional[_Union[_common_pb2.CsrSubject, _Mapping]] = ...) -> None: ...

class GenerateCSRResponse(_message.Message):
    __slots__ = ("csr_pem", "public_key_sha256")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    public_key_sha256: str
    def __init__(self, csr_pem: _Optional[str] = ..., public_key_sha256: _Optional[str] = ...) -> None: ...

class AgentStatusRequest(_message.Message):
    __slots__ = ("leader_fence",)
    LEADER_FENCE_FIELD_NUMBER: _ClassVar[int]
    leader_fence: int
    def __init__(self, leader_fence: _Optional[int] = ...) -> None: ...

class SlotKey(_message.Message):
    __slots__ = ("slot", "public_key_sha256", "key_type", "held_keys")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    HELD_KEYS_FIELD_NUMBER: _ClassVar[int]
    slot: _common_pb2.Slot
    public_key_sha256: str
    key_type: _common_pb2.KeyType
    held_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., public_key_sha256: _Optional[str] = ..., key_type: _Optional[_Union[_common_pb2.KeyType, str]] = ..., held_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class AgentStatusResponse(_message.Message):
    __slots__ = ("peer_id", "version", "front_mode", "front_listening", "open_tokens", "challenge_server_listening", "keys", "certificates", "tls_endpoints", "retired_keys", "switching", "leader_fence")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRONT_MODE_FIELD_NUMBER: _ClassVar[int]
    FRONT_LISTENING_FIELD_NUMBER: _ClassVar[int]
    OPEN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_SERVER_LISTENING_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    TLS_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    RETIRED_KEYS_FIELD_NUMBER: _ClassVar[int]
    SWITCHING_FIELD_NUMBER: _ClassVar[int]
    LEADER_FENCE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    version: str
    front_mode: str
    front_listening: bool
    open_tokens: int
    challenge_server_listening: bool
    keys: _containers.RepeatedCompositeFieldContainer[SlotKey]
    certificates: _containers.RepeatedCompositeFieldContainer[_common_pb2.SlotCertificates]
    tls_endpoints: _containers.RepeatedScalarFieldContainer[str]
    retired_keys: _containers.RepeatedCompositeFieldContainer[RetiredKey]
    switching: _containers.RepeatedCompositeFieldContainer[_common_pb2.Slot]
    leader_fence: int
    def __init__(self, peer_id: _Optional[str] = ..., version: _Optional[str] = ..., front_mode: _Optional[str] = ..., front_listening: _Optional[bool] = ..., open_tokens: _Optional[int] = ..., challenge_server_listening: _Optional[bool] = ..., keys: _Optional[_Iterable[_Union[SlotKey, _Mapping]]] = ..., certificates: _Optional[_Iterable[_Union[_common_pb2.SlotCertificates, _Mapping]]] = ..., tls_endpoints: _Optional[_Iterable[str]] = ..., retired_keys: _Optional[_Iterable[_Union[RetiredKey, _Mapping]]] = ..., switching: _Optional[_Iterable[_Union[_common_pb2.Slot, _Mapping]]] = ..., leader_fence: _Optional[int] = ...) -> None: ...
