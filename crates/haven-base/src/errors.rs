//! Describing errors for logs and replies.

use std::error::Error;

/// An error and its causes on one line: hyper's own message is often just "client
/// error", and what actually went wrong is in the causes.
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::io;

    #[test]
    fn every_cause_is_named_in_order() {
        let outer = Wrapped(Wrapped(io::Error::other("connection refused")));
        assert_eq!(super::chain(&outer), "wrapped: wrapped: connection refused");
    }

    #[derive(Debug)]
    struct Wrapped<E>(E);

    impl<E> std::fmt::Display for Wrapped<E> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }

    impl<E: std::error::Error + 'static> std::error::Error for Wrapped<E> {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
