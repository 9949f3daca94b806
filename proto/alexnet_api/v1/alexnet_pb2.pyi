from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    PENDING: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    STOPPING: _ClassVar[JobState]
    FINISHED: _ClassVar[JobState]
    STOPPED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    INTERRUPTED: _ClassVar[JobState]

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    ONNX: _ClassVar[ExportFormat]
    TORCH_EXPORT: _ClassVar[ExportFormat]
    SAFETENSORS: _ClassVar[ExportFormat]
JOB_STATE_UNSPECIFIED: JobState
PENDING: JobState
RUNNING: JobState
STOPPING: JobState
FINISHED: JobState
STOPPED: JobState
FAILED: JobState
INTERRUPTED: JobState
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
ONNX: ExportFormat
TORCH_EXPORT: ExportFormat
SAFETENSORS: ExportFormat

class TrainingSpec(_message.Message):
    __slots__ = ("data_dir", "builtin", "val_dir", "class_names_file", "preset", "overrides", "checkpoint_dir", "resume_from", "log_dir", "init_from")
    class OverridesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    VAL_DIR_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FILE_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_DIR_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    LOG_DIR_FIELD_NUMBER: _ClassVar[int]
    INIT_FROM_FIELD_NUMBER: _ClassVar[int]
    data_dir: str
    builtin: BuiltinDataset
    val_dir: str
    class_names_file: str
    preset: str
    overrides: _containers.ScalarMap[str, str]
    checkpoint_dir: str
    resume_from: str
    log_dir: str
    init_from: str
    def __init__(self, data_dir: _Optional[str] = ..., builtin: _Optional[_Union[BuiltinDataset, _Mapping]] = ..., val_dir: _Optional[str] = ..., class_names_file: _Optional[str] = ..., preset: _Optional[str] = ..., overrides: _Optional[_Mapping[str, str]] = ..., checkpoint_dir: _Optional[str] = ..., resume_from: _Optional[str] = ..., log_dir: _Optional[str] = ..., init_from: _Optional[str] = ...) -> None: ...

class BuiltinDataset(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobRef(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "epoch", "epochs", "steps_per_epoch", "loss", "top1_accuracy", "top5_accuracy", "images_per_second", "learning_rate", "skipped_images", "elapsed_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOP1_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TOP5_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    epoch: int
    epochs: int
    steps_per_epoch: int
    loss: float
    top1_accuracy: float
    top5_accuracy: float
    images_per_second: float
    learning_rate: float
    skipped_images: int
    elapsed_seconds: float
    def __init__(self, step: _Optional[int] = ..., epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., steps_per_epoch: _Optional[int] = ..., loss: _Optional[float] = ..., top1_accuracy: _Optional[float] = ..., top5_accuracy: _Optional[float] = ..., images_per_second: _Optional[float] = ..., learning_rate: _Optional[float] = ..., skipped_images: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("job_id", "state", "spec", "progress", "error", "model_version", "created_unix", "ended_unix", "restarts", "checkpoint", "log_dir")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    ENDED_UNIX_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    LOG_DIR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    spec: TrainingSpec
    progress: Progress
    error: str
    model_version: int
    created_unix: float
    ended_unix: float
    restarts: int
    checkpoint: str
    log_dir: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., spec: _Optional[_Union[TrainingSpec, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., error: _Optional[str] = ..., model_version: _Optional[int] = ..., created_unix: _Optional[float] = ..., ended_unix: _Optional[float] = ..., restarts: _Optional[int] = ..., checkpoint: _Optional[str] = ..., log_dir: _Optional[str] = ...) -> None: ...

class TrainingEvent(_message.Message):
    __slots__ = ("job_id", "kind", "state", "progress", "model_version", "message")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[TrainingEvent.Kind]
        STATE: _ClassVar[TrainingEvent.Kind]
        STEP: _ClassVar[TrainingEvent.Kind]
        EPOCH: _ClassVar[TrainingEvent.Kind]
        PUBLISHED: _ClassVar[TrainingEvent.Kind]
        RECOVERED: _ClassVar[TrainingEvent.Kind]
    KIND_UNSPECIFIED: TrainingEvent.Kind
    STATE: TrainingEvent.Kind
    STEP: TrainingEvent.Kind
    EPOCH: TrainingEvent.Kind
    PUBLISHED: TrainingEvent.Kind
    RECOVERED: TrainingEvent.Kind
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: TrainingEvent.Kind
    state: JobState
    progress: Progress
    model_version: int
    message: str
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[_Union[TrainingEvent.Kind, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., model_version: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ListTrainingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTrainingsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[TrainingJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[TrainingJob, _Mapping]]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "top_k")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    top_k: int
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_k: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("class_index", "label", "probability")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    probability: float
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("top",)
    TOP_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, top: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results", "model_version", "model_note")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NOTE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    model_version: int
    model_note: str
    def __init__(self, results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., model_version: _Optional[int] = ..., model_note: _Optional[str] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("model_version", "job_id", "format")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    job_id: str
    format: ExportFormat
    def __init__(self, model_version: _Optional[int] = ..., job_id: _Optional[str] = ..., format: _Optional[_Union[ExportFormat, str]] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data", "total_bytes", "file_name", "source")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_bytes: int
    file_name: str
    source: str
    def __init__(self, data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., file_name: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class GetKernelsRequest(_message.Message):
    __slots__ = ("model_version", "job_id")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    job_id: str
    def __init__(self, model_version: _Optional[int] = ..., job_id: _Optional[str] = ...) -> None: ...

class KernelsFigure(_message.Message):
    __slots__ = ("png", "width", "height", "kernels_per_tower", "colour_specialisation", "model_version", "source")
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    KERNELS_PER_TOWER_FIELD_NUMBER: _ClassVar[int]
    COLOUR_SPECIALISATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    width: int
    height: int
    kernels_per_tower: _containers.RepeatedScalarFieldContainer[int]
    colour_specialisation: _containers.RepeatedScalarFieldContainer[float]
    model_version: int
    source: str
    def __init__(self, png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., kernels_per_tower: _Optional[_Iterable[int]] = ..., colour_specialisation: _Optional[_Iterable[float]] = ..., model_version: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "kind", "outputs", "outputs_per_tower", "sees", "kernel", "stride", "pad", "then", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_PER_TOWER_FIELD_NUMBER: _ClassVar[int]
    SEES_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    THEN_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    outputs: int
    outputs_per_tower: _containers.RepeatedScalarFieldContainer[int]
    sees: str
    kernel: int
    stride: int
    pad: int
    then: _containers.RepeatedScalarFieldContainer[str]
    parameters: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., outputs: _Optional[int] = ..., outputs_per_tower: _Optional[_Iterable[int]] = ..., sees: _Optional[str] = ..., kernel: _Optional[int] = ..., stride: _Optional[int] = ..., pad: _Optional[int] = ..., then: _Optional[_Iterable[str]] = ..., parameters: _Optional[int] = ...) -> None: ...

class TowerInfo(_message.Message):
    __slots__ = ("index", "device", "host", "parameters", "replica", "node")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    index: int
    device: str
    host: str
    parameters: int
    replica: int
    node: str
    def __init__(self, index: _Optional[int] = ..., device: _Optional[str] = ..., host: _Optional[str] = ..., parameters: _Optional[int] = ..., replica: _Optional[int] = ..., node: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("layers", "towers", "classes", "model_version", "parameters", "model_note", "image_size", "transport", "training_towers", "training_replicas", "precision")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOWERS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NOTE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TOWERS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    towers: _containers.RepeatedCompositeFieldContainer[TowerInfo]
    classes: _containers.RepeatedScalarFieldContainer[str]
    model_version: int
    parameters: int
    model_note: str
    image_size: int
    transport: str
    training_towers: _containers.RepeatedCompositeFieldContainer[TowerInfo]
    training_replicas: int
    precision: str
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., towers: _Optional[_Iterable[_Union[TowerInfo, _Mapping]]] = ..., classes: _Optional[_Iterable[str]] = ..., model_version: _Optional[int] = ..., parameters: _Optional[int] = ..., model_note: _Optional[str] = ..., image_size: _Optional[int] = ..., transport: _Optional[str] = ..., training_towers: _Optional[_Iterable[_Union[TowerInfo, _Mapping]]] = ..., training_replicas: _Optional[int] = ..., precision: _Optional[str] = ...) -> None: ...
