"""The error classes under the names the product's documentation uses.

`from backpropagate.exceptions import DatasetError, GPUError` gives our own classes, not copies:
`except GPUError` catches what the services raise, and every error keeps the stable code and
exit code the error catalogue lists (docs/reference/errors.md). Where the documentation names
a class we have no twin of, the name is the closest class (docs/troubleshooting.md has the
table): we raise nothing SLAO-specific, so a campaign's failed merge is a TrainingError.
"""

from __future__ import annotations

from backpropagate_api.errors import (
    BackpropagateError,
    CheckpointInvalidError,
    ConfigError,
    ConversionError,
    DatasetError,
    DatasetFormatUnknownError,
    DatasetParseError,
    DatasetValidationError,
    ExportError,
    ExportMergeError,
    GpuError,
    GpuNotAvailableError,
    GpuOutOfMemoryError,
    GpuTemperatureCriticalError,
    ModelLoadError,
    NotFoundError,
    OllamaRegistrationError,
    PartialFailureError,
    RunInterruptedError,
    RuntimeFailure,
)

ConfigurationError = ConfigError
InvalidSettingError = ConfigError
DatasetNotFoundError = NotFoundError  # a missing file is INPUT_NOT_FOUND, dataset or not
DatasetFormatError = DatasetFormatUnknownError
TrainingError = RuntimeFailure
TrainingAbortedError = RunInterruptedError
CheckpointError = CheckpointInvalidError
LoRAExportError = ExportError
GGUFExportError = ConversionError
MergeExportError = ExportMergeError
GPUError = GpuError
GPUNotAvailableError = GpuNotAvailableError
GPUMemoryError = GpuOutOfMemoryError
GPUTemperatureError = GpuTemperatureCriticalError
GPUMonitoringError = GpuError
SLAOError = RuntimeFailure
SLAOMergeError = RuntimeFailure
SLAOCheckpointError = CheckpointInvalidError
BatchOperationError = PartialFailureError

__all__ = [
    "BackpropagateError",
    "BatchOperationError",
    "CheckpointError",
    "ConfigurationError",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetParseError",
    "DatasetValidationError",
    "ExportError",
    "GGUFExportError",
    "GPUError",
    "GPUMemoryError",
    "GPUMonitoringError",
    "GPUNotAvailableError",
    "GPUTemperatureError",
    "InvalidSettingError",
    "LoRAExportError",
    "MergeExportError",
    "ModelLoadError",
    "OllamaRegistrationError",
    "SLAOCheckpointError",
    "SLAOError",
    "SLAOMergeError",
    "TrainingAbortedError",
    "TrainingError",
]
