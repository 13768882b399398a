//! An append-only list that readers index and walk without a lock.
//!
//! Endpoints found at run time (the original destination of an intercepted connection) join
//! their cluster's list while calls read it; an index, once given, names the same entry for
//! the agent's life, so the breakers, the pool and the correlation table can keep naming an
//! endpoint by its index.

use std::sync::{
    Mutex, OnceLock, PoisonError,
    atomic::{AtomicUsize, Ordering},
};

pub struct GrowList<T> {
    slots: Box<[OnceLock<T>]>,
    /// Entries set: every slot below is set before this moves past it.
    len: AtomicUsize,
    /// One writer at a time (pushes are rare: a new endpoint).
    push: Mutex<()>,
}

impl<T> GrowList<T> {
    /// The entries of `items`, with room for `extra` more.
    pub fn new(items: impl IntoIterator<Item = T>, extra: usize) -> Self {
        let items: Vec<T> = items.into_iter().collect();
        let len = items.len();
        let slots: Box<[OnceLock<T>]> = items
            .into_iter()
            .map(OnceLock::from)
            .chain((0..extra).map(|_| OnceLock::new()))
            .collect();
        Self {
            slots,
            len: AtomicUsize::new(len),
            push: Mutex::new(()),
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether another entry fits.
    pub fn full(&self) -> bool {
        self.len() >= self.slots.len()
    }

    pub fn get(&self, index: usize) -> Option<&T> {
        self.slots.get(index)?.get()
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots[..self.len()].iter().filter_map(OnceLock::get)
    }

    /// Appends an entry and returns its index; gives it back when the list is full.
    pub fn push(&self, item: T) -> Result<usize, T> {
        let _one_writer = self.push.lock().unwrap_or_else(PoisonError::into_inner);
        let index = self.len.load(Ordering::Acquire);
        let Some(slot) = self.slots.get(index) else {
            return Err(item);
        };
        slot.set(item)?;
        self.len.store(index + 1, Ordering::Release);
        Ok(index)
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for GrowList<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::GrowList;

    #[test]
    fn indexes_stay_and_the_end_is_kept() {
        let list = GrowList::new(["a", "b"], 1);
        assert_eq!(list.len(), 2);
        assert_eq!(list.push("c"), Ok(2));
        assert_eq!(list.push("d"), Err("d"));
        assert!(list.full());
        assert_eq!(list.get(1), Some(&"b"));
        assert_eq!(list.get(3), None);
        assert_eq!(list.iter().copied().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn readers_see_whole_entries_while_another_thread_pushes() {
        let list = std::sync::Arc::new(GrowList::new(Vec::<String>::new(), 1000));
        let writer = {
            let list = list.clone();
            std::thread::spawn(move || {
                for i in 0..1000 {
                    assert_eq!(list.push(format!("e{i}")), Ok(i));
                }
            })
        };
        while list.len() < 1000 {
            for (i, e) in list.iter().enumerate() {
                assert_eq!(*e, format!("e{i}"));
            }
        }
        assert!(writer.join().is_ok());
    }
}
