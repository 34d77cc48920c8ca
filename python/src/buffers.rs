//! Bytes between Python and Rust. Where the buffer protocol is available (a
//! build for one Python version, or the stable ABI from 3.11), large payloads
//! cross without copies: Python buffers are borrowed while Rust sends them,
//! and received frames are exposed to Python as [`Frame`]s, so unpickled
//! numpy arrays use the network buffer itself. The stable-ABI build for
//! Python 3.9 and 3.10, whose limited API has no buffer protocol, copies
//! into and out of `bytes` instead (the same results, more memory traffic).

pub use imp::{frame, frames_to_py, register, to_bytes};

#[cfg(any(not(Py_LIMITED_API), Py_3_11))]
mod imp {
    use std::ffi::{c_int, c_void};

    use bytes::{Bytes, BytesMut};
    use pyo3::buffer::PyBuffer;
    use pyo3::ffi;
    use pyo3::prelude::*;
    use pyo3::types::PyList;

    /// Keeps a Python buffer export alive while Rust sends its bytes.
    struct PyBufOwner(PyBuffer<u8>);

    impl AsRef<[u8]> for PyBufOwner {
        fn as_ref(&self) -> &[u8] {
            // SAFETY: the export stays valid while the PyBuffer lives; it is
            // C-contiguous (checked at construction) and `len_bytes` long.
            unsafe { std::slice::from_raw_parts(self.0.buf_ptr() as *const u8, self.0.len_bytes()) }
        }
    }

    /// Buffers smaller than this are copied at once; larger ones are borrowed.
    /// A borrowed buffer is released with the GIL from whatever thread drops it,
    /// so borrowing only pays off for large payloads.
    const BORROW_MIN: usize = 64 * 1024;

    /// Any bytes-like Python object as `Bytes`: large buffers without copying.
    pub fn to_bytes(obj: &Bound<'_, PyAny>) -> PyResult<Bytes> {
        let buf = PyBuffer::<u8>::get(obj)?;
        if !buf.is_c_contiguous() {
            let v = buf.to_vec(obj.py())?;
            return Ok(Bytes::from(v));
        }
        let owner = PyBufOwner(buf);
        if owner.as_ref().len() < BORROW_MIN {
            return Ok(Bytes::copy_from_slice(owner.as_ref()));
        }
        Ok(Bytes::from_owner(owner))
    }

    /// Received bytes exposed to Python through the buffer protocol (writable
    /// when this process owns them alone), so unpickled numpy arrays use the
    /// network buffer directly.
    #[pyclass(frozen, module = "dask_rs._core")]
    pub struct Frame {
        ptr: usize,
        len: usize,
        readonly: bool,
        _keep: FrameData,
    }

    enum FrameData {
        Shared(#[allow(dead_code)] Bytes),
        Owned(#[allow(dead_code)] BytesMut),
    }

    impl Frame {
        fn new(b: Bytes) -> Frame {
            match b.try_into_mut() {
                Ok(mut m) => {
                    Frame { ptr: m.as_mut_ptr() as usize, len: m.len(), readonly: false, _keep: FrameData::Owned(m) }
                }
                Err(b) => Frame { ptr: b.as_ptr() as usize, len: b.len(), readonly: true, _keep: FrameData::Shared(b) },
            }
        }
    }

    #[pymethods]
    impl Frame {
        unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
            let me = slf.get();
            let ro = if me.readonly { 1 } else { 0 };
            // SAFETY: the memory lives as long as `slf`, which the view keeps a reference to.
            let rc = unsafe {
                ffi::PyBuffer_FillInfo(view, slf.as_ptr(), me.ptr as *mut c_void, me.len as isize, ro, flags)
            };
            if rc == -1 {
                return Err(PyErr::fetch(slf.py()));
            }
            Ok(())
        }

        unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

        fn __len__(&self) -> usize {
            self.len
        }
    }

    /// Received bytes as a Python object, without copying.
    pub fn frame(py: Python<'_>, b: Bytes) -> PyResult<Bound<'_, PyAny>> {
        Ok(Bound::new(py, Frame::new(b))?.into_any())
    }

    /// Received frames as a Python list, without copying.
    pub fn frames_to_py<'py>(py: Python<'py>, parts: Vec<Bytes>) -> PyResult<Bound<'py, PyList>> {
        let items: Vec<Bound<'py, Frame>> =
            parts.into_iter().map(|p| Bound::new(py, Frame::new(p))).collect::<PyResult<_>>()?;
        PyList::new(py, items)
    }

    /// Add `Frame` to the module.
    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_class::<Frame>()
    }
}

#[cfg(all(Py_LIMITED_API, not(Py_3_11)))]
mod imp {
    use bytes::Bytes;
    use pyo3::prelude::*;
    use pyo3::types::{PyBytes, PyList};

    /// Any bytes-like Python object as `Bytes` (a copy: `bytes(obj)`).
    pub fn to_bytes(obj: &Bound<'_, PyAny>) -> PyResult<Bytes> {
        if let Ok(b) = obj.cast::<PyBytes>() {
            return Ok(Bytes::copy_from_slice(b.as_bytes()));
        }
        let b = obj.py().get_type::<PyBytes>().call1((obj,))?;
        Ok(Bytes::copy_from_slice(b.cast::<PyBytes>()?.as_bytes()))
    }

    /// Received bytes as Python `bytes` (a copy).
    pub fn frame(py: Python<'_>, b: Bytes) -> PyResult<Bound<'_, PyAny>> {
        Ok(PyBytes::new(py, &b).into_any())
    }

    /// Received frames as a list of Python `bytes` (copies).
    pub fn frames_to_py<'py>(py: Python<'py>, parts: Vec<Bytes>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, parts.iter().map(|p| PyBytes::new(py, p)))
    }

    /// Nothing to add: there is no `Frame` type in this build.
    pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
        Ok(())
    }
}
