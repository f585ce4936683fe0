//! NUMA placement of guest memory: where pages live ([`topology`]), host
//! memory policies and the placement report ([`policy`]), which vCPU writes
//! which page ([`sampling`]), and the scanner that moves pages to their
//! users' node ([`scanner`]).

pub mod policy;
pub mod sampling;
pub mod scanner;
pub mod topology;

#[cfg(test)]
mod tests;
