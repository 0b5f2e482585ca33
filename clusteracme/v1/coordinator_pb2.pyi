from clusteracme.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListOrdersRequest(_message.Message):
    __slots__ = ("peer_id", "slot", "state", "limit")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    state: str
    limit: int
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., state: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListOrdersResponse(_message.Message):
    __slots__ = ("orders",)
    ORDERS_FIELD_NUMBER: _ClassVar[int]
    orders: _containers.RepeatedCompositeFieldContainer[OrderInfo]
    def __init__(self, orders: _Optional[_Iterable[_Union[OrderInfo, _Mapping]]] = ...) -> None: ...

class BackupRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackupManifest(_message.Message):
    __slots__ = ("format", "prefix", "revision", "created_at", "coordinator_version", "record_schema", "entry_count", "value_bytes", "sha256", "skipped_leased", "created_by")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORD_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    ENTRY_COUNT_FIELD_NUMBER: _ClassVar[int]
    VALUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_LEASED_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    format: int
    prefix: str
    revision: int
    created_at: str
    coordinator_version: str
    record_schema: int
    entry_count: int
    value_bytes: int
    sha256: str
    skipped_leased: int
    created_by: str
    def __init__(self, format: _Optional[int] = ..., prefix: _Optional[str] = ..., revision: _Optional[int] = ..., created_at: _Optional[str] = ..., coordinator_version: _Optional[str] = ..., record_schema: _Optional[int] = ..., entry_count: _Optional[int] = ..., value_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., skipped_leased: _Optional[int] = ..., created_by: _Optional[str] = ...) -> None: ...

class BackupEntry(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class BackupChunk(_message.Message):
    __slots__ = ("manifest", "entries")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    manifest: BackupManifest
    entries: _containers.RepeatedCompositeFieldContainer[BackupEntry]
    def __init__(self, manifest: _Optional[_Union[BackupManifest, _Mapping]] = ..., entries: _Optional[_Iterable[_Union[BackupEntry, _Mapping]]] = ...) -> None: ...

class RestoreChunk(_message.Message):
    __slots__ = ("manifest", "entries")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    manifest: BackupManifest
    entries: _containers.RepeatedCompositeFieldContainer[BackupEntry]
    def __init__(self, manifest: _Optional[_Union[BackupManifest, _Mapping]] = ..., entries: _Optional[_Iterable[_Union[BackupEntry, _Mapping]]] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("entry_count", "revision", "detail")
    ENTRY_COUNT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    entry_count: int
    revision: int
    detail: str
    def __init__(self, entry_count: _Optional[int] = ..., revision: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class ListCoordinatorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CoordinatorInfo(_message.Message):
    __slots__ = ("name", "address", "role", "version", "started_at", "role_since")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ROLE_SINCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    role: str
    version: str
    started_at: str
    role_since: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[str] = ..., version: _Optional[str] = ..., started_at: _Optional[str] = ..., role_since: _Optional[str] = ...) -> None: ...

class ListCoordinatorsResponse(_message.Message):
    __slots__ = ("coordinators", "leader", "answered_by")
    COORDINATORS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_BY_FIELD_NUMBER: _ClassVar[int]
    coordinators: _containers.RepeatedCompositeFieldContainer[CoordinatorInfo]
    leader: str
    answered_by: str
    def __init__(self, coordinators: _Optional[_Iterable[_Union[CoordinatorInfo, _Mapping]]] = ..., leader: _Optional[str] = ..., answered_by: _Optional[str] = ...) -> None: ...

class Alarm(_message.Message):
    __slots__ = ("kind", "peer_id", "slot", "severity", "detail", "raised_at", "cleared_at", "active")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RAISED_AT_FIELD_NUMBER: _ClassVar[int]
    CLEARED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    peer_id: str
    slot: _common_pb2.Slot
    severity: str
    detail: str
    raised_at: str
    cleared_at: str
    active: bool
    def __init__(self, kind: _Optional[str] = ..., peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., severity: _Optional[str] = ..., detail: _Optional[str] = ..., raised_at: _Optional[str] = ..., cleared_at: _Optional[str] = ..., active: _Optional[bool] = ...) -> None: ...

class ListAlarmsRequest(_message.Message):
    __slots__ = ("peer_id", "all")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    all: bool
    def __init__(self, peer_id: _Optional[str] = ..., all: _Optional[bool] = ...) -> None: ...

class ListAlarmsResponse(_message.Message):
    __slots__ = ("alarms",)
    ALARMS_FIELD_NUMBER: _ClassVar[int]
    alarms: _containers.RepeatedCompositeFieldContainer[Alarm]
    def __init__(self, alarms: _Optional[_Iterable[_Union[Alarm, _Mapping]]] = ...) -> None: ...

class SetDefaultProviderRequest(_message.Message):
    __slots__ = ("provider",)
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    provider: str
    def __init__(self, provider: _Optional[str] = ...) -> None: ...

class GetCSRRequest(_message.Message):
    __slots__ = ("peer_id", "slot")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ...) -> None: ...

class ImportPendingRequest(_message.Message):
    __slots__ = ("peer_id", "slot", "chain")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    chain: bytes
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., chain: _Optional[bytes] = ...) -> None: ...

class DomainSlot(_message.Message):
    __slots__ = ("slot", "acme_enabled", "names", "active_serial", "active_not_after", "days_left", "mode", "provider", "active_provider", "paused")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ACME_ENABLED_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    DAYS_LEFT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    slot: _common_pb2.Slot
    acme_enabled: bool
    names: str
    active_serial: str
    active_not_after: str
    days_left: int
    mode: str
    provider: str
    active_provider: str
    paused: str
    def __init__(self, slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., acme_enabled: _Optional[bool] = ..., names: _Optional[str] = ..., active_serial: _Optional[str] = ..., active_not_after: _Optional[str] = ..., days_left: _Optional[int] = ..., mode: _Optional[str] = ..., provider: _Optional[str] = ..., active_provider: _Optional[str] = ..., paused: _Optional[str] = ...) -> None: ...

class ListDomainsRequest(_message.Message):
    __slots__ = ("peer_id",)
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    def __init__(self, peer_id: _Optional[str] = ...) -> None: ...

class ListDomainsResponse(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[DomainSlot]
    def __init__(self, slots: _Optional[_Iterable[_Union[DomainSlot, _Mapping]]] = ...) -> None: ...

class SetDomainAcmeRequest(_message.Message):
    __slots__ = ("peer_id", "slot", "enabled")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    enabled: bool
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., enabled: _Optional[bool] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("peer_id", "slot")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("peer_id", "slot")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ...) -> None: ...

class DeployResult(_message.Message):
    __slots__ = ("peer_id", "slot", "ok", "error", "active_serial_hex", "previous_serial_hex", "reloads")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    ok: bool
    error: str
    active_serial_hex: str
    previous_serial_hex: str
    reloads: _containers.RepeatedCompositeFieldContainer[_common_pb2.ReloadResult]
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., active_serial_hex: _Optional[str] = ..., previous_serial_hex: _Optional[str] = ..., reloads: _Optional[_Iterable[_Union[_common_pb2.ReloadResult, _Mapping]]] = ...) -> None: ...

class RolloutRequest(_message.Message):
    __slots__ = ("peer_ids", "all", "batch", "rollback_on_failure", "slot")
    PEER_IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    peer_ids: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    batch: int
    rollback_on_failure: bool
    slot: _common_pb2.Slot
    def __init__(self, peer_ids: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ..., batch: _Optional[int] = ..., rollback_on_failure: _Optional[bool] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ...) -> None: ...

class RolloutEvent(_message.Message):
    __slots__ = ("peer_id", "stage", "detail", "serial_hex")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    stage: str
    detail: str
    serial_hex: str
    def __init__(self, peer_id: _Optional[str] = ..., stage: _Optional[str] = ..., detail: _Optional[str] = ..., serial_hex: _Optional[str] = ...) -> None: ...

class HistoryEvent(_message.Message):
    __slots__ = ("id", "at", "peer_id", "slot", "who", "what", "result", "serial_hex", "previous_serial_hex", "detail", "certificate_pem")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    WHAT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    id: str
    at: str
    peer_id: str
    slot: _common_pb2.Slot
    who: str
    what: str
    result: str
    serial_hex: str
    previous_serial_hex: str
    detail: str
    certificate_pem: str
    def __init__(self, id: _Optional[str] = ..., at: _Optional[str] = ..., peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., who: _Optional[str] = ..., what: _Optional[str] = ..., result: _Optional[str] = ..., serial_hex: _Optional[str] = ..., previous_serial_hex: _Optional[str] = ..., detail: _Optional[str] = ..., certificate_pem: _Optional[str] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("peer_id", "limit")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    limit: int
    def __init__(self, peer_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[HistoryEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[HistoryEvent, _Mapping]]] = ...) -> None: ...

class RegisterPeerRequest(_message.Message):
    __slots__ = ("peer_id", "addresses", "grpc_endpoint", "http_front", "front_mode", "version", "tls_endpoints")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    GRPC_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    HTTP_FRONT_FIELD_NUMBER: _ClassVar[int]
    FRONT_MODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TLS_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    grpc_endpoint: str
    http_front: str
    front_mode: str
    version: str
    tls_endpoints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peer_id: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., grpc_endpoint: _Optional[str] = ..., http_front: _Optional[str] = ..., front_mode: _Optional[str] = ..., version: _Optional[str] = ..., tls_endpoints: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterPeerResponse(_message.Message):
    __slots__ = ("heartbeat_interval_seconds", "lease_ttl_seconds", "trust_bundle_pem", "trust_bundle_sha256", "denied_sha256")
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    DENIED_SHA256_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_seconds: int
    lease_ttl_seconds: int
    trust_bundle_pem: str
    trust_bundle_sha256: str
    denied_sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, heartbeat_interval_seconds: _Optional[int] = ..., lease_ttl_seconds: _Optional[int] = ..., trust_bundle_pem: _Optional[str] = ..., trust_bundle_sha256: _Optional[str] = ..., denied_sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("peer_id",)
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    def __init__(self, peer_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("denied_sha256",)
    DENIED_SHA256_FIELD_NUMBER: _ClassVar[int]
    denied_sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, denied_sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class Provider(_message.Message):
    __slots__ = ("name", "directory_url", "terms_of_service", "account_url", "account_status", "contact", "has_ca_bundle", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_URL_FIELD_NUMBER: _ClassVar[int]
    TERMS_OF_SERVICE_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_URL_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_STATUS_FIELD_NUMBER: _ClassVar[int]
    CONTACT_FIELD_NUMBER: _ClassVar[int]
    HAS_CA_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    directory_url: str
    terms_of_service: str
    account_url: str
    account_status: str
    contact: str
    has_ca_bundle: bool
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., directory_url: _Optional[str] = ..., terms_of_service: _Optional[str] = ..., account_url: _Optional[str] = ..., account_status: _Optional[str] = ..., contact: _Optional[str] = ..., has_ca_bundle: _Optional[bool] = ..., is_default: _Optional[bool] = ...) -> None: ...

class AddProviderRequest(_message.Message):
    __slots__ = ("name", "directory_url", "ca_bundle_pem")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_URL_FIELD_NUMBER: _ClassVar[int]
    CA_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    name: str
    directory_url: str
    ca_bundle_pem: str
    def __init__(self, name: _Optional[str] = ..., directory_url: _Optional[str] = ..., ca_bundle_pem: _Optional[str] = ...) -> None: ...

class ListProvidersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListProvidersResponse(_message.Message):
    __slots__ = ("providers", "default_provider")
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    providers: _containers.RepeatedCompositeFieldContainer[Provider]
    default_provider: str
    def __init__(self, providers: _Optional[_Iterable[_Union[Provider, _Mapping]]] = ..., default_provider: _Optional[str] = ...) -> None: ...

class RegisterAccountRequest(_message.Message):
    __slots__ = ("provider", "email", "agree_tos", "eab_kid", "eab_hmac_key")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    AGREE_TOS_FIELD_NUMBER: _ClassVar[int]
    EAB_KID_FIELD_NUMBER: _ClassVar[int]
    EAB_HMAC_KEY_FIELD_NUMBER: _ClassVar[int]
    provider: str
    email: str
    agree_tos: bool
    eab_kid: str
    eab_hmac_key: str
    def __init__(self, provider: _Optional[str] = ..., email: _Optional[str] = ..., agree_tos: _Optional[bool] = ..., eab_kid: _Optional[str] = ..., eab_hmac_key: _Optional[str] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("peer_id", "addresses", "grpc_endpoint", "http_front", "front_mode", "version", "enabled", "alive", "registered_at", "tls_endpoints", "blocked")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    GRPC_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    HTTP_FRONT_FIELD_NUMBER: _ClassVar[int]
    FRONT_MODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    TLS_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    grpc_endpoint: str
    http_front: str
    front_mode: str
    version: str
    enabled: bool
    alive: bool
    registered_at: str
    tls_endpoints: _containers.RepeatedScalarFieldContainer[str]
    blocked: str
    def __init__(self, peer_id: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., grpc_endpoint: _Optional[str] = ..., http_front: _Optional[str] = ..., front_mode: _Optional[str] = ..., version: _Optional[str] = ..., enabled: _Optional[bool] = ..., alive: _Optional[bool] = ..., registered_at: _Optional[str] = ..., tls_endpoints: _Optional[_Iterable[str]] = ..., blocked: _Optional[str] = ...) -> None: ...

class ListPeersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPeersResponse(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    def __init__(self, peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ...) -> None: ...

class SetPeerEnabledRequest(_message.Message):
    __slots__ = ("peer_id", "enabled")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    enabled: bool
    def __init__(self, peer_id: _Optional[str] = ..., enabled: _Optional[bool] = ...) -> None: ...

class RemovePeerRequest(_message.Message):
    __slots__ = ("peer_id", "force")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    force: bool
    def __init__(self, peer_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class BlockPeerRequest(_message.Message):
    __slots__ = ("peer_id", "reason")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    reason: str
    def __init__(self, peer_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeIdentityRequest(_message.Message):
    __slots__ = ("certificate", "reason")
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    certificate: bytes
    reason: str
    def __init__(self, certificate: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...

class DeniedIdentity(_message.Message):
    __slots__ = ("sha256", "common_name", "serial_hex", "not_after", "reason", "denied_at", "denied_by")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    COMMON_NAME_FIELD_NUMBER: _ClassVar[int]
    SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DENIED_AT_FIELD_NUMBER: _ClassVar[int]
    DENIED_BY_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    common_name: str
    serial_hex: str
    not_after: str
    reason: str
    denied_at: str
    denied_by: str
    def __init__(self, sha256: _Optional[str] = ..., common_name: _Optional[str] = ..., serial_hex: _Optional[str] = ..., not_after: _Optional[str] = ..., reason: _Optional[str] = ..., denied_at: _Optional[str] = ..., denied_by: _Optional[str] = ...) -> None: ...

class ListDeniedRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDeniedResponse(_message.Message):
    __slots__ = ("identities",)
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    identities: _containers.RepeatedCompositeFieldContainer[DeniedIdentity]
    def __init__(self, identities: _Optional[_Iterable[_Union[DeniedIdentity, _Mapping]]] = ...) -> None: ...

class RemovePeerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateCSRRequest(_message.Message):
    __slots__ = ("peer_id", "slot", "common_name", "sans", "key_type", "subject", "provider")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    COMMON_NAME_FIELD_NUMBER: _ClassVar[int]
    SANS_FIELD_NUMBER: _ClassVar[int]
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    common_name: str
    sans: _containers.RepeatedScalarFieldContainer[str]
    key_type: _common_pb2.KeyType
    subject: _common_pb2.CsrSubject
    provider: str
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., common_name: _Optional[str] = ..., sans: _Optional[_Iterable[str]] = ..., key_type: _Optional[_Union[_common_pb2.KeyType, str]] = ..., subject: _Optional[_Union[_common_pb2.CsrSubject, _Mapping]] = ..., provider: _Optional[str] = ...) -> None: ...

class CSRInfo(_message.Message):
    __slots__ = ("peer_id", "slot", "common_name", "names", "key_type", "csr_pem", "created_at", "subject", "subject_text", "public_key_sha256", "provider")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    COMMON_NAME_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    common_name: str
    names: _containers.RepeatedScalarFieldContainer[str]
    key_type: str
    csr_pem: str
    created_at: str
    subject: _common_pb2.CsrSubject
    subject_text: str
    public_key_sha256: str
    provider: str
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., common_name: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., key_type: _Optional[str] = ..., csr_pem: _Optional[str] = ..., created_at: _Optional[str] = ..., subject: _Optional[_Union[_common_pb2.CsrSubject, _Mapping]] = ..., subject_text: _Optional[str] = ..., public_key_sha256: _Optional[str] = ..., provider: _Optional[str] = ...) -> None: ...

class SignRequest(_message.Message):
    __slots__ = ("peer_id", "slot", "wait", "force", "provider")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    wait: bool
    force: bool
    provider: str
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., wait: _Optional[bool] = ..., force: _Optional[bool] = ..., provider: _Optional[str] = ...) -> None: ...

class PreflightRequest(_message.Message):
    __slots__ = ("peer_id", "slot")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ...) -> None: ...

class DnsAddress(_message.Message):
    __slots__ = ("address", "family", "peer_ids")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PEER_IDS_FIELD_NUMBER: _ClassVar[int]
    address: str
    family: str
    peer_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, address: _Optional[str] = ..., family: _Optional[str] = ..., peer_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class NameReport(_message.Message):
    __slots__ = ("name", "addresses", "problem")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    name: str
    addresses: _containers.RepeatedCompositeFieldContainer[DnsAddress]
    problem: str
    def __init__(self, name: _Optional[str] = ..., addresses: _Optional[_Iterable[_Union[DnsAddress, _Mapping]]] = ..., problem: _Optional[str] = ...) -> None: ...

class PreflightReport(_message.Message):
    __slots__ = ("names", "ok")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedCompositeFieldContainer[NameReport]
    ok: bool
    def __init__(self, names: _Optional[_Iterable[_Union[NameReport, _Mapping]]] = ..., ok: _Optional[bool] = ...) -> None: ...

class AuthorizationProgress(_message.Message):
    __slots__ = ("name", "status", "url")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: str
    url: str
    def __init__(self, name: _Optional[str] = ..., status: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class PeerAck(_message.Message):
    __slots__ = ("peer_id", "acknowledged", "self_checked", "error", "required", "skipped")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    SELF_CHECKED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    acknowledged: bool
    self_checked: bool
    error: str
    required: bool
    skipped: bool
    def __init__(self, peer_id: _Optional[str] = ..., acknowledged: _Optional[bool] = ..., self_checked: _Optional[bool] = ..., error: _Optional[str] = ..., required: _Optional[bool] = ..., skipped: _Optional[bool] = ...) -> None: ...

class OrderInfo(_message.Message):
    __slots__ = ("order_id", "peer_id", "slot", "phase", "order_url", "names", "authorizations", "peers", "error", "created_at", "updated_at", "done", "succeeded", "provider", "queue_position", "dns")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ORDER_URL_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATIONS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    DNS_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    peer_id: str
    slot: _common_pb2.Slot
    phase: str
    order_url: str
    names: _containers.RepeatedScalarFieldContainer[str]
    authorizations: _containers.RepeatedCompositeFieldContainer[AuthorizationProgress]
    peers: _containers.RepeatedCompositeFieldContainer[PeerAck]
    error: str
    created_at: str
    updated_at: str
    done: bool
    succeeded: bool
    provider: str
    queue_position: int
    dns: _containers.RepeatedCompositeFieldContainer[NameReport]
    def __init__(self, order_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., phase: _Optional[str] = ..., order_url: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., authorizations: _Optional[_Iterable[_Union[AuthorizationProgress, _Mapping]]] = ..., peers: _Optional[_Iterable[_Union[PeerAck, _Mapping]]] = ..., error: _Optional[str] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ..., done: _Optional[bool] = ..., succeeded: _Optional[bool] = ..., provider: _Optional[str] = ..., queue_position: _Optional[int] = ..., dns: _Optional[_Iterable[_Union[NameReport, _Mapping]]] = ...) -> None: ...

class GetOrderRequest(_message.Message):
    __slots__ = ("order_id", "refresh")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    refresh: bool
    def __init__(self, order_id: _Optional[str] = ..., refresh: _Optional[bool] = ...) -> None: ...

class GetPendingRequest(_message.Message):
    __slots__ = ("peer_id", "slot")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ...) -> None: ...

class PendingCertificate(_message.Message):
    __slots__ = ("peer_id", "slot", "certificate", "chain_pem", "provider", "order_url", "signed_at", "requested_subject", "imported")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ORDER_URL_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    certificate: _common_pb2.CertificateSummary
    chain_pem: str
    provider: str
    order_url: str
    signed_at: str
    requested_subject: str
    imported: bool
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., certificate: _Optional[_Union[_common_pb2.CertificateSummary, _Mapping]] = ..., chain_pem: _Optional[str] = ..., provider: _Optional[str] = ..., order_url: _Optional[str] = ..., signed_at: _Optional[str] = ..., requested_subject: _Optional[str] = ..., imported: _Optional[bool] = ...) -> None: ...

class DiscardPendingRequest(_message.Message):
    __slots__ = ("peer_id", "slot")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ...) -> None: ...

class DiscardPendingResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("peer_id",)
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    def __init__(self, peer_id: _Optional[str] = ...) -> None: ...

class SlotStatus(_message.Message):
    __slots__ = ("slot", "csr_names", "csr_created_at", "pending_serial", "pending_not_after", "last_sign_status", "last_sign_at", "last_sign_error", "current_order", "active_serial", "active_not_after", "previous_serial", "last_deploy_status", "last_deploy_at", "last_deploy_error", "agent_matches", "agent_state", "schedule", "acme_enabled", "active_provider", "alarms", "active_not_before")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CSR_NAMES_FIELD_NUMBER: _ClassVar[int]
    CSR_CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PENDING_SERIAL_FIELD_NUMBER: _ClassVar[int]
    PENDING_NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    LAST_SIGN_STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_SIGN_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SIGN_ERROR_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ORDER_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SERIAL_FIELD_NUMBER: _ClassVar[int]
    LAST_DEPLOY_STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_DEPLOY_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_DEPLOY_ERROR_FIELD_NUMBER: _ClassVar[int]
    AGENT_MATCHES_FIELD_NUMBER: _ClassVar[int]
    AGENT_STATE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    ACME_ENABLED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ALARMS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    slot: _common_pb2.Slot
    csr_names: str
    csr_created_at: str
    pending_serial: str
    pending_not_after: str
    last_sign_status: str
    last_sign_at: str
    last_sign_error: str
    current_order: str
    active_serial: str
    active_not_after: str
    previous_serial: str
    last_deploy_status: str
    last_deploy_at: str
    last_deploy_error: str
    agent_matches: bool
    agent_state: str
    schedule: ScheduleInfo
    acme_enabled: bool
    active_provider: str
    alarms: _containers.RepeatedCompositeFieldContainer[Alarm]
    active_not_before: str
    def __init__(self, slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., csr_names: _Optional[str] = ..., csr_created_at: _Optional[str] = ..., pending_serial: _Optional[str] = ..., pending_not_after: _Optional[str] = ..., last_sign_status: _Optional[str] = ..., last_sign_at: _Optional[str] = ..., last_sign_error: _Optional[str] = ..., current_order: _Optional[str] = ..., active_serial: _Optional[str] = ..., active_not_after: _Optional[str] = ..., previous_serial: _Optional[str] = ..., last_deploy_status: _Optional[str] = ..., last_deploy_at: _Optional[str] = ..., last_deploy_error: _Optional[str] = ..., agent_matches: _Optional[bool] = ..., agent_state: _Optional[str] = ..., schedule: _Optional[_Union[ScheduleInfo, _Mapping]] = ..., acme_enabled: _Optional[bool] = ..., active_provider: _Optional[str] = ..., alarms: _Optional[_Iterable[_Union[Alarm, _Mapping]]] = ..., active_not_before: _Optional[str] = ...) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("peer", "slots", "alarms")
    PEER_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ALARMS_FIELD_NUMBER: _ClassVar[int]
    peer: Peer
    slots: _containers.RepeatedCompositeFieldContainer[SlotStatus]
    alarms: _containers.RepeatedCompositeFieldContainer[Alarm]
    def __init__(self, peer: _Optional[_Union[Peer, _Mapping]] = ..., slots: _Optional[_Iterable[_Union[SlotStatus, _Mapping]]] = ..., alarms: _Optional[_Iterable[_Union[Alarm, _Mapping]]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[PeerStatus]
    def __init__(self, peers: _Optional[_Iterable[_Union[PeerStatus, _Mapping]]] = ...) -> None: ...

class SetScheduleRequest(_message.Message):
    __slots__ = ("peer_id", "slot", "auto", "days", "time", "tz", "key_policy", "provider")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TZ_FIELD_NUMBER: _ClassVar[int]
    KEY_POLICY_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    auto: str
    days: str
    time: str
    tz: str
    key_policy: str
    provider: str
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., auto: _Optional[str] = ..., days: _Optional[str] = ..., time: _Optional[str] = ..., tz: _Optional[str] = ..., key_policy: _Optional[str] = ..., provider: _Optional[str] = ...) -> None: ...

class GetScheduleRequest(_message.Message):
    __slots__ = ("peer_id",)
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    def __init__(self, peer_id: _Optional[str] = ...) -> None: ...

class ScheduleInfo(_message.Message):
    __slots__ = ("peer_id", "slot", "auto", "days", "time", "tz", "key_policy", "renewal_due_at", "renewal_reason", "next_sign_opportunity", "next_deploy_slot", "retry_at", "failures", "warning", "last_sign_status", "last_sign_at", "last_deploy_status", "last_deploy_at", "provider", "paused")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TZ_FIELD_NUMBER: _ClassVar[int]
    KEY_POLICY_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_DUE_AT_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_REASON_FIELD_NUMBER: _ClassVar[int]
    NEXT_SIGN_OPPORTUNITY_FIELD_NUMBER: _ClassVar[int]
    NEXT_DEPLOY_SLOT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AT_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    LAST_SIGN_STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_SIGN_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_DEPLOY_STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_DEPLOY_AT_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    auto: bool
    days: str
    time: str
    tz: str
    key_policy: str
    renewal_due_at: str
    renewal_reason: str
    next_sign_opportunity: str
    next_deploy_slot: str
    retry_at: str
    failures: int
    warning: str
    last_sign_status: str
    last_sign_at: str
    last_deploy_status: str
    last_deploy_at: str
    provider: str
    paused: str
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., auto: _Optional[bool] = ..., days: _Optional[str] = ..., time: _Optional[str] = ..., tz: _Optional[str] = ..., key_policy: _Optional[str] = ..., renewal_due_at: _Optional[str] = ..., renewal_reason: _Optional[str] = ..., next_sign_opportunity: _Optional[str] = ..., next_deploy_slot: _Optional[str] = ..., retry_at: _Optional[str] = ..., failures: _Optional[int] = ..., warning: _Optional[str] = ..., last_sign_status: _Optional[str] = ..., last_sign_at: _Optional[str] = ..., last_deploy_status: _Optional[str] = ..., last_deploy_at: _Optional[str] = ..., provider: _Optional[str] = ..., paused: _Optional[str] = ...) -> None: ...

class GetScheduleResponse(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[ScheduleInfo]
    def __init__(self, slots: _Optional[_Iterable[_Union[ScheduleInfo, _Mapping]]] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("certificate", "provider", "reason", "force")
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    certificate: bytes
    provider: str
    reason: str
    force: bool
    def __init__(self, certificate: _Optional[bytes] = ..., provider: _Optional[str] = ..., reason: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("serial_hex", "provider", "authorization", "ca_answer", "reason", "refused")
    SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    CA_ANSWER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    serial_hex: str
    provider: str
    authorization: str
    ca_answer: str
    reason: str
    refused: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, serial_hex: _Optional[str] = ..., provider: _Optional[str] = ..., authorization: _Optional[str] = ..., ca_answer: _Optional[str] = ..., reason: _Optional[str] = ..., refused: _Optional[_Iterable[str]] = ...) -> None: ...

class TrustedCA(_message.Message):
    __slots__ = ("sha256", "subject", "issuer", "not_before", "not_after", "self_signed", "added", "type")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    SELF_SIGNED_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    subject: str
    issuer: str
    not_before: str
    not_after: str
    self_signed: bool
    added: bool
    type: str
    def __init__(self, sha256: _Optional[str] = ..., subject: _Optional[str] = ..., issuer: _Optional[str] = ..., not_before: _Optional[str] = ..., not_after: _Optional[str] = ..., self_signed: _Optional[bool] = ..., added: _Optional[bool] = ..., type: _Optional[str] = ...) -> None: ...

class TrustAddRequest(_message.Message):
    __slots__ = ("certificates", "preset")
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    certificates: bytes
    preset: str
    def __init__(self, certificates: _Optional[bytes] = ..., preset: _Optional[str] = ...) -> None: ...

class TrustListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrustRemoveRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class TrustedCAs(_message.Message):
    __slots__ = ("certificates",)
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    certificates: _containers.RepeatedCompositeFieldContainer[TrustedCA]
    def __init__(self, certificates: _Optional[_Iterable[_Union[TrustedCA, _Mapping]]] = ...) -> None: ...

class TrustVerifyRequest(_message.Message):
    __slots__ = ("peer_id", "slot", "active")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    slot: _common_pb2.Slot
    active: bool
    def __init__(self, peer_id: _Optional[str] = ..., slot: _Optional[_Union[_common_pb2.Slot, _Mapping]] = ..., active: _Optional[bool] = ...) -> None: ...

class TrustVerifyResponse(_message.Message):
    __slots__ = ("ok", "reason", "path", "serial_hex", "which")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SERIAL_HEX_FIELD_NUMBER: _ClassVar[int]
    WHICH_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    path: _containers.RepeatedScalarFieldContainer[str]
    serial_hex: str
    which: str
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ..., path: _Optional[_Iterable[str]] = ..., serial_hex: _Optional[str] = ..., which: _Optional[str] = ...) -> None: ...
