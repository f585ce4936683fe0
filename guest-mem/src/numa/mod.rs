//! NUMA placement of guest memory: where pages live ([`topology`]), host
//! memory policies and the placement report ([`policy`]), which vCPU writes
//! which page ([`sampling`]), and the scanner that moves pages to their
//! users' node ([`scanner`]), and a drill that exercises it on a simulated
//! host ([`drill`]).

pub mod drill;
pub mod policy;
pub mod sampling;
pub mod scanner;
pub mod topology;

#[cfg(test)]
mod tests;
