//! The runtime's stack-walk unit tests, built the way `cargo memscope` builds the
//! runtime: optimized, with frame pointers. A plain `cargo test` builds them without
//! frame pointers, where there is little chain to walk and nothing to reuse.

use std::process::Command;

#[test]
fn the_runtimes_stack_walk_tests_pass_optimized_with_frame_pointers() {
    let mut command = Command::new("cargo");
    command
        .args([
            "test",
            "--release",
            "--lib",
            "-p",
            "memscope-runtime",
            "stack::",
        ])
        .current_dir(memscope_e2e::repo_root());
    memscope_e2e::clean_env(&mut command);
    command
        .env(
            "CARGO_TARGET_DIR",
            memscope_e2e::e2e_target_root().join("runtime-walk"),
        )
        .env("RUSTFLAGS", "-C force-frame-pointers=yes")
        // A test that finds no frame-pointer chain fails instead of skipping.
        .env("MEMSCOPE_EXPECT_FRAME_POINTERS", "1");
    let output = command.output().expect("cargo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("test result: ok. 6 passed"), "{stdout}");
}
