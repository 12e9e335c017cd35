//! `#[memscope::instrument]` and `#[derive(Trackable)]` at compile time (trybuild):
//! every supported item compiles and runs unchanged in an ordinary build, and errors,
//! memscope's and the user's own, point at the user's code (the `.stderr` files).

#[test]
fn annotated_code_compiles_and_runs_as_without_the_attribute() {
    trybuild::TestCases::new().pass("ui/pass/*.rs");
}

#[test]
fn errors_point_at_the_users_code() {
    trybuild::TestCases::new().compile_fail("ui/fail/*.rs");
}
