//! Procedural macros for memscope (see issue: instrument).
