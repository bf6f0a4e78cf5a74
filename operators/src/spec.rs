//! Short constructors for input and output specs, so node schemas read like ComfyUI's.

use nova_dataflow::{DataType, FileFolder, InputKind, InputSpec, OutputSpec};

/// `impl Default` through `new()` for node types, whose `new()` builds their schema.
macro_rules! default_via_new {
    ($($t:ty),* $(,)?) => {
        $(impl Default for $t {
            fn default() -> Self {
                Self::new()
            }
        })*
    };
}
pub(crate) use default_via_new;

/// ComfyUI's `MAX_RESOLUTION`.
pub(crate) const MAX_RESOLUTION: i64 = 16384;

pub(crate) fn link(name: &'static str, t: DataType) -> InputSpec {
    InputSpec {
        name,
        kind: InputKind::Link(t),
        required: true,
        tooltip: "",
    }
}

pub(crate) fn int(name: &'static str, default: i64, min: i64, max: i64) -> InputSpec {
    int_step(name, default, min, max, 1)
}

/// An integer input that moves in `step`s.
pub(crate) fn int_step(
    name: &'static str,
    default: i64,
    min: i64,
    max: i64,
    step: i64,
) -> InputSpec {
    InputSpec {
        name,
        kind: InputKind::Int {
            default,
            min,
            max,
            step,
        },
        required: true,
        tooltip: "",
    }
}

pub(crate) fn float(name: &'static str, default: f64, min: f64, max: f64, step: f64) -> InputSpec {
    InputSpec {
        name,
        kind: InputKind::Float {
            default,
            min,
            max,
            step,
        },
        required: true,
        tooltip: "",
    }
}

pub(crate) fn string(name: &'static str, default: &str) -> InputSpec {
    InputSpec {
        name,
        kind: InputKind::String {
            default: default.into(),
            multiline: false,
        },
        required: true,
        tooltip: "",
    }
}

pub(crate) fn combo(name: &'static str, options: &[&str]) -> InputSpec {
    InputSpec {
        name,
        kind: InputKind::Combo {
            options: options.iter().map(|s| s.to_string()).collect(),
            default: options[0].to_string(),
        },
        required: true,
        tooltip: "",
    }
}

pub(crate) fn input_file(name: &'static str) -> InputSpec {
    InputSpec {
        name,
        kind: InputKind::File {
            folder: FileFolder::Input,
            image_upload: true,
        },
        required: true,
        tooltip: "",
    }
}

pub(crate) fn out(name: &'static str, data_type: DataType) -> OutputSpec {
    OutputSpec { name, data_type }
}
