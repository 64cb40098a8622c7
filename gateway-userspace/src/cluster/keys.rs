//! The key layout under the store's prefix.

/// Builds and parses the store's keys under one prefix (which ends with `/`).
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn apps(&self) -> String {
        format!("{}apps/", self.prefix)
    }

    pub(crate) fn app(&self, name: &str) -> String {
        format!("{}apps/{name}", self.prefix)
    }

    pub(crate) fn ports(&self) -> String {
        format!("{}ports/", self.prefix)
    }

    /// Zero-padded to five digits, so that the keys sort (and range) in port order.
    pub(crate) fn port(&self, port: u16) -> String {
        format!("{}ports/{port:05}", self.prefix)
    }

    pub(crate) fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    pub(crate) fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }

    pub(crate) fn statuses(&self) -> String {
        format!("{}status/", self.prefix)
    }

    pub(crate) fn status(&self, node: &str, app: &str) -> String {
        format!("{}status/{node}/{app}", self.prefix)
    }

    /// The part of `key` after `under` (one of the prefixes above), if it is there.
    pub(crate) fn strip<'k>(key: &'k [u8], under: &str) -> Option<&'k str> {
        std::str::from_utf8(key).ok()?.strip_prefix(under)
    }

    /// The port of a `ports/<port>` key.
    pub(crate) fn parse_port(&self, key: &[u8]) -> Option<u16> {
        Self::strip(key, &self.ports())?.parse().ok()
    }
}

/// Whether `name` can be a key segment (app and node names): not empty, no `/`, printable.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != '\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let k = Keys::new("/gw");
        assert_eq!(k.app("web"), "/gw/apps/web");
        assert_eq!(k.port(8080), "/gw/ports/08080");
        assert_eq!(k.parse_port(b"/gw/ports/08080"), Some(8080));
        assert_eq!(k.parse_port(b"/gw/apps/web"), None);
        assert_eq!(k.status("tcp-1", "web"), "/gw/status/tcp-1/web");
        assert!(valid_name("web-1"));
        assert!(!valid_name("a/b") && !valid_name("") && !valid_name("a b"));
    }
}
