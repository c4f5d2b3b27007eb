//! Kinds chosen by name in the config (`model.name`, `data.format`): the built-in ones listed by
//! their module, one line each, and more registered at run time by a program that uses the
//! library (its own model or data format, trained by ringtrain's loop).
//!
//! A kind parses its own section of the config into its own struct, so its keys, defaults and
//! checks live in its file; the config keeps only the keys every kind shares.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::any::Any;
use std::fmt::Debug;
use std::sync::RwLock;

/// A registered kind: its config name and how it parses its section.
pub trait Named: Copy + 'static {
    fn name(&self) -> &'static str;
}

/// The kinds of one sort (models, data formats), looked up by config name.
pub struct Registry<K: Named> {
    /// "model" or "data format", for messages.
    what: &'static str,
    builtin: fn() -> Vec<K>,
    added: RwLock<Vec<K>>,
}

impl<K: Named> Registry<K> {
    pub const fn new(what: &'static str, builtin: fn() -> Vec<K>) -> Self {
        Registry { what, builtin, added: RwLock::new(Vec::new()) }
    }

    /// Every kind: the built-in ones, then those registered, in order.
    pub fn all(&self) -> Vec<K> {
        let mut all = (self.builtin)();
        all.extend(self.added.read().unwrap_or_else(|e| e.into_inner()).iter().copied());
        all
    }

    /// The kind called `name`; the error lists the known names.
    pub fn get(&self, name: &str) -> Result<K, String> {
        let all = self.all();
        all.iter().find(|k| k.name() == name).copied().ok_or_else(|| {
            let known: Vec<&str> = all.iter().map(|k| k.name()).collect();
            format!("unknown {} `{name}` (known: {})", self.what, known.join(", "))
        })
    }

    /// Adds a kind, e.g. a program's own model, before its config is read. A name already taken
    /// is an error: a config must mean one thing.
    pub fn register(&self, kind: K) -> Result<(), String> {
        if self.all().iter().any(|k| k.name() == kind.name()) {
            return Err(format!("{} `{}` is already registered", self.what, kind.name()));
        }
        self.added.write().unwrap_or_else(|e| e.into_inner()).push(kind);
        Ok(())
    }
}

/// What every kind's parsed config offers for free: written back into the resolved config, and
/// looked at as its own type by code that knows it (`ringtrain sample` reads GPT's sizes).
pub trait Spec: Any + Debug + Send + Sync {
    /// The section's own keys, with defaults filled in (the run directory's `config.yaml`).
    fn to_value(&self) -> serde_yaml::Value;
    fn as_any(&self) -> &dyn Any;
}

impl<T: Serialize + Any + Debug + Send + Sync> Spec for T {
    fn to_value(&self) -> serde_yaml::Value {
        serde_yaml::to_value(self).expect("a config section serialises")
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Parses a kind's keys into its config struct. A field's error begins with `.field`, which the
/// config joins to the section's name (`model.n_layer: invalid type …`).
pub fn parse<T: DeserializeOwned>(keys: serde_yaml::Mapping) -> Result<T, String> {
    serde_path_to_error::deserialize(serde_yaml::Value::Mapping(keys)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            inner
        } else {
            format!(".{path}: {inner}")
        }
    })
}

/// Takes `key` out of `keys` and parses it; absent: `None`.
pub fn take<T: DeserializeOwned>(keys: &mut serde_yaml::Mapping, key: &str) -> Result<Option<T>, String> {
    match keys.remove(key) {
        None => Ok(None),
        Some(v) => serde_yaml::from_value(v).map(Some).map_err(|e| format!(".{key}: {e}")),
    }
}

/// `keys` with the shared keys first, then the kind's own (the order `config.yaml` shows).
pub fn merged(shared: serde_yaml::Mapping, own: serde_yaml::Value) -> serde_yaml::Mapping {
    let mut out = shared;
    if let serde_yaml::Value::Mapping(m) = own {
        out.extend(m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy)]
    struct K(&'static str);
    impl Named for K {
        fn name(&self) -> &'static str {
            self.0
        }
    }
    static R: Registry<K> = Registry::new("thing", || vec![K("a"), K("b")]);

    #[test]
    fn lookup_names_the_known_kinds_and_registration_refuses_a_taken_name() {
        assert_eq!(R.get("b").unwrap().0, "b");
        assert_eq!(R.get("zz").err().unwrap(), "unknown thing `zz` (known: a, b)");
        assert!(R.register(K("a")).unwrap_err().contains("already registered"));
        R.register(K("c")).unwrap();
        assert_eq!(R.get("c").unwrap().0, "c");
        assert!(R.get("zz").err().unwrap().ends_with("(known: a, b, c)"));
    }
}
