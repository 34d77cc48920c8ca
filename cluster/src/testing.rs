//! Test fixtures shared by the state-machine tests: a wrapper whose event
//! methods validate the machine's invariants after every event.

/// For a wrapper `$w` (a tuple struct around a state machine, with an
/// `after(&self, event: &str)` method that validates and may trace), define
/// one method per listed event: it traces its arguments when
/// `DASK_RS_TRACE` is set, forwards to the state machine, then calls
/// `after`. Tests send events only through these methods, so no event
/// reaches the machine unchecked.
macro_rules! checked_events {
    ($w:ty { $(fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;)* }) => {
        #[allow(clippy::too_many_arguments, dead_code)]
        impl $w {
            $(
                pub(crate) fn $name(&mut self, $($arg: $ty),*) $(-> $ret)? {
                    if std::env::var_os("DASK_RS_TRACE").is_some() {
                        eprintln!("{}{:?}", stringify!($name), ($(&$arg,)*));
                    }
                    let r = self.0.$name($($arg),*);
                    self.after(stringify!($name));
                    r
                }
            )*
        }
    };
}

pub(crate) use checked_events;
