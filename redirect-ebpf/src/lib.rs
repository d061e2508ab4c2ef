#![no_std]
// The programs are in main.rs (a `bin`, as aya-build expects); this file enables the library target.
