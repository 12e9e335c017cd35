//! Every kind of item the attribute goes on, in an ordinary build: same results.
use std::collections::HashMap;
use std::rc::Rc;

#[memscope::instrument]
fn free(n: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(n);
    v.push(1);
    let (a, b) = (2, String::from("x"));
    let Some(c) = Some(3) else { return v };
    v.extend([a, b.len() as u32, c]);
    v
}

#[memscope::instrument(name = "generic scope", skip_vars)]
fn generic<T: Default + Clone>(n: usize) -> Vec<T> {
    vec![T::default(); n]
}

struct Store<T> {
    items: Vec<T>,
}

#[memscope::instrument]
impl<T: Clone> Store<T> {
    fn new() -> Self {
        Store { items: Vec::new() }
    }
    fn push(&mut self, item: T) -> usize {
        let before = self.items.len();
        self.items.push(item);
        before
    }
    const fn zero() -> usize {
        0
    }
    async fn first(&self) -> Option<T> {
        let first = self.items.first().cloned();
        first
    }
}

#[memscope::instrument]
mod inner {
    pub fn parsed(s: &str) -> Result<u32, std::num::ParseIntError> {
        let n = s.parse()?;
        let doubled: u32 = n;
        Ok(doubled * 2)
    }
    pub mod deeper {
        pub fn counts() -> usize {
            let m: std::collections::HashMap<u8, u8> = (0..4).map(|i| (i, i)).collect();
            m.len()
        }
    }
}

#[memscope::instrument]
async fn fallible(s: &str) -> Result<u32, std::num::ParseIntError> {
    let n: u32 = s.parse()?;
    if n > 100 {
        return Ok(100);
    }
    Ok(n)
}

#[derive(memscope::Trackable)]
struct Book {
    orders: Vec<u64>,
    name: String,
    plain: u32,
}

#[derive(memscope::Trackable)]
enum Shape<T> {
    Named { label: String },
    Points(Vec<T>, Rc<str>),
    Empty,
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fn main() {
    use memscope::TaskExt;
    assert_eq!(free(4), vec![1, 2, 1, 3]);
    assert_eq!(generic::<u8>(3), vec![0, 0, 0]);
    let mut store = Store::new();
    assert_eq!(store.push(5), 0);
    assert_eq!(Store::<u8>::zero(), 0);
    assert_eq!(block_on(store.first()), Some(5));
    assert_eq!(inner::parsed("21"), Ok(42));
    assert!(inner::parsed("x").is_err());
    assert_eq!(inner::deeper::counts(), 4);
    assert_eq!(block_on(fallible("7")), Ok(7));
    assert_eq!(block_on(async { 3 }.memscope_task("plain")), 3);
    let book = Book { orders: vec![1], name: "b".into(), plain: 2 };
    memscope::track!(book);
    let shapes = [Shape::Named { label: "l".into() }, Shape::Points(vec![1u8], Rc::from("p")), Shape::Empty];
    memscope::track!(shapes);
    let _scope = memscope::scope("manual");
    let map: HashMap<u8, u8> = HashMap::new();
    memscope::track!(map);
    assert_eq!(book.orders.len() + book.name.len() + book.plain as usize, 4);
}
