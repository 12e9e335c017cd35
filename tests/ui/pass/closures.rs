//! Bindings inside closures and async blocks of an instrumented function: the
//! registration there must not make the closure borrow anything of the function's, so
//! closures that leave the function still compile.

#[memscope::instrument]
fn counter() -> impl Fn() -> usize {
    let base = vec![1u8, 2, 3];
    let len = base.len();
    move || {
        let doubled = len * 2;
        doubled
    }
}

#[memscope::instrument]
fn boxed() -> Box<dyn Fn() -> Vec<u8>> {
    Box::new(|| {
        let fresh = vec![0u8; 4];
        fresh
    })
}

#[memscope::instrument]
fn later() -> impl std::future::Future<Output = String> {
    async {
        let text = String::from("done");
        text
    }
}

fn main() {
    assert_eq!(counter()(), 6);
    assert_eq!(boxed()().len(), 4);
    drop(later());
}
