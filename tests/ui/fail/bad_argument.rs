#[memscope::instrument(verbose)]
fn f() {}

#[memscope::instrument(name = 3)]
fn g() {}

fn main() {
    f();
    g();
}
