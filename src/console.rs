//! What commands print for people and scripts. A reader that went away (`| head`, a closed
//! pipe: EPIPE) is not a failure: it took what it wanted, and the command keeps the exit
//! code that says what happened (`verify-cert`'s 0/2 included). `print!` would panic
//! instead (exit 101).

use std::io::{self, Write};

/// Writes `text` to stdout as is and flushes it; a closed pipe is success, any other write
/// error is returned (a full disk under `> file` is worth saying).
pub fn print(text: &str) -> io::Result<()> {
    write_all(&mut io::stdout().lock(), text.as_bytes())
}

/// `text` and a newline on stdout, as [`print`].
pub fn println(text: &str) -> io::Result<()> {
    print(&format!("{text}\n"))
}

/// `text` and a newline on stderr; a failure is dropped (there is nowhere left to say it).
pub fn eprintln(text: &str) {
    let _ = write_all(&mut io::stderr().lock(), format!("{text}\n").as_bytes());
}

fn write_all(to: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    match to.write_all(bytes).and_then(|()| to.flush()) {
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, Write};

    /// A writer whose reader went away.
    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    struct Full;
    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(28))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_is_success_and_other_errors_are_not() {
        assert!(super::write_all(&mut Closed, b"x").is_ok());
        assert!(super::write_all(&mut Full, b"x").is_err());
    }
}
