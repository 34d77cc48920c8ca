//! Tells the compiler which Python the extension is built for (`Py_3_11`,
//! `Py_LIMITED_API`), so that `buffers` picks its zero-copy or copying side.

fn main() {
    pyo3_build_config::use_pyo3_cfgs();
}
