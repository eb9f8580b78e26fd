"""The package's own exceptions: one base class, one subclass per kind of bad input.

Every error a user can trigger (a wrong path, a corrupt or hostile checkpoint or server, an odd image, an absurd
size) is raised as one of these, with a message that names the file or value and says what to do. They derive from
`ValueError` too, so code written against the earlier `ValueError`s keeps working.

    SegformerError
    ├── ConfigError        a config.json (or preprocessor_config.json) that is missing, malformed or out of range
    ├── CheckpointError    weights that cannot be loaded: missing, corrupt, mis-shaped, NaN
    │   └── DownloadError  a checkpoint that could not be fetched from the hub, or arrived damaged
    ├── ImageError         an input that is not an image we can segment
    ├── LabelError         training labels that do not fit the logits (shape, dtype, range, none labelled)
    ├── ResourceError      work that would exceed a limit (memory, pixels) before it starts
    └── MachineError       a tool asked for what this machine lacks (bench --cpu avx2: cpuid faulting, cc)
"""


class SegformerError(ValueError):
    """Base class of every error mininp_segformer raises on bad input."""


class ConfigError(SegformerError):
    """A `config.json` that is missing, not JSON, not SegFormer, or inconsistent."""


class CheckpointError(SegformerError):
    """A checkpoint that cannot be loaded: missing files, a corrupt file, or tensors that don't fit the config."""


class DownloadError(CheckpointError):
    """A checkpoint that could not be fetched: hub unreachable, HTTP error, or a download that arrived damaged."""


class ImageError(SegformerError):
    """An input that is not an image we can segment."""


class LabelError(SegformerError):
    """Labels a loss cannot use: the wrong shape or dtype, a class id out of range, or no labelled pixel at all."""


class ResourceError(SegformerError):
    """Work refused before it starts because it would exceed a limit (memory, pixels, header size)."""


class MachineError(SegformerError):
    """A tool asked for something this machine cannot give: the benchmark's `--cpu avx2` on a CPU without cpuid
    faulting, or with no C compiler to build its shim."""
