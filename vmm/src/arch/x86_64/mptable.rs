//! The Intel MultiProcessor Specification 1.4 table, which tells the guest kernel how many
//! CPUs there are and how the IOAPIC pins are wired, without ACPI.
//!
//! Layout at [`EBDA_START`]: the floating pointer structure, then the configuration table
//! header, then the entries (processors, the ISA bus, the IOAPIC, one I/O interrupt entry per
//! IOAPIC pin, and the two local interrupt entries: ExtINT on LINT0, NMI on LINT1).

use std::mem::size_of;

use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX, MAX_VCPUS, MPTABLE_MAX_SIZE};

const SMP_MAGIC_IDENT: [u8; 4] = *b"_MP_";
const MPC_SIGNATURE: [u8; 4] = *b"PCMP";
const MPC_SPEC: u8 = 4;
const MPC_OEM: [u8; 8] = *b"HUSK    ";
const MPC_PRODUCT_ID: [u8; 12] = *b"000000000000";
const BUS_TYPE_ISA: [u8; 6] = *b"ISA   ";

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const MP_IRQPOL_DEFAULT: u16 = 0;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MPC_APIC_USABLE: u8 = 1;

/// Errors of [`setup_mptable`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    /// More vCPUs than the table (and the VMM) supports.
    #[error("an MP table cannot describe {0} vCPUs (at most {MAX_VCPUS})")]
    TooManyCpus(u8),
    /// Zero vCPUs.
    #[error("an MP table needs at least one vCPU")]
    NoCpus,
    /// The table does not fit in guest memory.
    #[error("the MP table does not fit in guest memory")]
    NotEnoughMemory,
    /// A write to guest memory failed.
    #[error("failed to write the MP table {0} into guest memory")]
    Write(&'static str),
}

/// MP floating pointer structure.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MpfIntel {
    pub signature: [u8; 4],
    pub physptr: u32,
    pub length: u8,
    pub specification: u8,
    pub checksum: u8,
    pub feature1: u8,
    pub feature2: u8,
    pub feature3: u8,
    pub feature4: u8,
    pub feature5: u8,
}

/// MP configuration table header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MpcTable {
    pub signature: [u8; 4],
    pub length: u16,
    pub spec: u8,
    pub checksum: u8,
    pub oem: [u8; 8],
    pub productid: [u8; 12],
    pub oemptr: u32,
    pub oemsize: u16,
    pub oemcount: u16,
    pub lapic: u32,
    pub reserved: u32,
}

/// Processor entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MpcCpu {
    pub type_: u8,
    pub apicid: u8,
    pub apicver: u8,
    pub cpuflag: u8,
    pub cpufeature: u32,
    pub featureflag: u32,
    pub reserved: [u32; 2],
}

/// Bus entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MpcBus {
    pub type_: u8,
    pub busid: u8,
    pub bustype: [u8; 6],
}

/// IOAPIC entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MpcIoapic {
    pub type_: u8,
    pub apicid: u8,
    pub apicver: u8,
    pub flags: u8,
    pub apicaddr: u32,
}

/// I/O interrupt assignment entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MpcIntsrc {
    pub type_: u8,
    pub irqtype: u8,
    pub irqflag: u16,
    pub srcbus: u8,
    pub srcbusirq: u8,
    pub dstapic: u8,
    pub dstirq: u8,
}

/// Local interrupt assignment entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MpcLintsrc {
    pub type_: u8,
    pub irqtype: u8,
    pub irqflag: u16,
    pub srcbusid: u8,
    pub srcbusirq: u8,
    pub destapic: u8,
    pub destapiclint: u8,
}

// SAFETY: plain-old-data structs of integers and byte arrays with no padding (their sizes are
// checked in the tests), so any byte pattern is a valid value.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: as above.
unsafe impl ByteValued for MpcTable {}
// SAFETY: as above.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: as above.
unsafe impl ByteValued for MpcBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIntsrc {}
// SAFETY: as above.
unsafe impl ByteValued for MpcLintsrc {}

/// The IOAPIC id: right after the CPUs' APIC ids.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus + 1
}

/// Total size of the floating pointer plus the configuration table for `num_cpus`.
pub fn mptable_size(num_cpus: u8) -> u64 {
    (size_of::<MpfIntel>()
        + size_of::<MpcTable>()
        + size_of::<MpcCpu>() * usize::from(num_cpus)
        + size_of::<MpcBus>()
        + size_of::<MpcIoapic>()
        + size_of::<MpcIntsrc>() * (IRQ_MAX as usize + 1)
        + size_of::<MpcLintsrc>() * 2) as u64
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Accumulates the entries of the configuration table, then writes everything at once.
struct TableWriter {
    bytes: Vec<u8>,
    count: u16,
}

impl TableWriter {
    fn push<T: ByteValued>(&mut self, entry: T) {
        self.bytes.extend_from_slice(entry.as_slice());
        self.count += 1;
    }
}

/// Writes the MP table for `num_cpus` vCPUs (APIC ids `0..num_cpus`) at [`EBDA_START`].
pub fn setup_mptable<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let size = mptable_size(num_cpus);
    debug_assert!(size <= MPTABLE_MAX_SIZE);
    let base = GuestAddress(EBDA_START);
    mem.checked_offset(base, size as usize)
        .ok_or(MptableError::NotEnoughMemory)?;

    let table_addr = base.unchecked_add(size_of::<MpfIntel>() as u64);
    let ioapicid = ioapic_id(num_cpus);
    let mut entries = TableWriter {
        bytes: Vec::with_capacity(size as usize),
        count: 0,
    };
    for cpu in 0..num_cpus {
        entries.push(MpcCpu {
            type_: MP_PROCESSOR,
            apicid: cpu,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 },
            cpufeature: CPU_STEPPING,
            featureflag: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
            reserved: [0; 2],
        });
    }
    entries.push(MpcBus {
        type_: MP_BUS,
        busid: 0,
        bustype: BUS_TYPE_ISA,
    });
    entries.push(MpcIoapic {
        type_: MP_IOAPIC,
        apicid: ioapicid,
        apicver: IOAPIC_VERSION,
        flags: MPC_APIC_USABLE,
        apicaddr: IOAPIC_START as u32,
    });
    for irq in 0..=IRQ_MAX as u8 {
        entries.push(MpcIntsrc {
            type_: MP_INTSRC,
            irqtype: MP_INT,
            irqflag: MP_IRQPOL_DEFAULT,
            srcbus: 0,
            srcbusirq: irq,
            dstapic: ioapicid,
            dstirq: irq,
        });
    }
    entries.push(MpcLintsrc {
        type_: MP_LINTSRC,
        irqtype: MP_EXTINT,
        irqflag: MP_IRQPOL_DEFAULT,
        srcbusid: 0,
        srcbusirq: 0,
        destapic: 0,
        destapiclint: 0,
    });
    entries.push(MpcLintsrc {
        type_: MP_LINTSRC,
        irqtype: MP_NMI,
        irqflag: MP_IRQPOL_DEFAULT,
        srcbusid: 0,
        srcbusirq: 0,
        destapic: 0xff,
        destapiclint: 1,
    });

    let mut header = MpcTable {
        signature: MPC_SIGNATURE,
        length: (size_of::<MpcTable>() + entries.bytes.len()) as u16,
        spec: MPC_SPEC,
        checksum: 0,
        oem: MPC_OEM,
        productid: MPC_PRODUCT_ID,
        oemptr: 0,
        oemsize: 0,
        oemcount: entries.count,
        lapic: APIC_START as u32,
        reserved: 0,
    };
    header.checksum = checksum(header.as_slice())
        .wrapping_add(checksum(&entries.bytes))
        .wrapping_neg();

    let mut mpf = MpfIntel {
        signature: SMP_MAGIC_IDENT,
        physptr: table_addr.raw_value() as u32,
        length: 1, // in 16-byte units
        specification: MPC_SPEC,
        ..Default::default()
    };
    mpf.checksum = checksum(mpf.as_slice()).wrapping_neg();

    mem.write_obj(mpf, base)
        .map_err(|_| MptableError::Write("floating pointer"))?;
    mem.write_obj(header, table_addr)
        .map_err(|_| MptableError::Write("header"))?;
    mem.write_slice(
        &entries.bytes,
        table_addr.unchecked_add(size_of::<MpcTable>() as u64),
    )
    .map_err(|_| MptableError::Write("entries"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("mmap")
    }

    fn read_bytes(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).expect("read");
        buf
    }

    #[test]
    fn structs_have_the_spec_sizes() {
        assert_eq!(size_of::<MpfIntel>(), 16);
        assert_eq!(size_of::<MpcTable>(), 44);
        assert_eq!(size_of::<MpcCpu>(), 20);
        assert_eq!(size_of::<MpcBus>(), 8);
        assert_eq!(size_of::<MpcIoapic>(), 8);
        assert_eq!(size_of::<MpcIntsrc>(), 8);
        assert_eq!(size_of::<MpcLintsrc>(), 8);
    }

    #[test]
    fn max_cpus_table_fits_in_the_ebda_slot() {
        assert!(mptable_size(MAX_VCPUS) <= MPTABLE_MAX_SIZE);
    }

    #[test]
    fn written_table_parses_back_with_zero_checksums() {
        let mem = mem();
        for cpus in [1u8, 4, MAX_VCPUS] {
            setup_mptable(&mem, cpus).expect("setup");
            let mpf: MpfIntel = mem.read_obj(GuestAddress(EBDA_START)).expect("mpf");
            assert_eq!(mpf.signature, *b"_MP_");
            assert_eq!(checksum(mpf.as_slice()), 0);
            assert_eq!(u64::from(mpf.physptr), EBDA_START + 16);

            let header: MpcTable = mem
                .read_obj(GuestAddress(u64::from(mpf.physptr)))
                .expect("hdr");
            assert_eq!(header.signature, *b"PCMP");
            assert_eq!(u64::from(header.length) + 16, mptable_size(cpus));
            let table = read_bytes(&mem, u64::from(mpf.physptr), usize::from(header.length));
            assert_eq!(checksum(&table), 0);
            assert_eq!(header.oemcount, u16::from(cpus) + 1 + 1 + 24 + 2);
            assert_eq!(header.lapic, 0xfee0_0000);

            // Walk the entries: processors first, in APIC-id order, the first one the BSP.
            let mut off = 44usize;
            for cpu in 0..cpus {
                let entry = MpcCpu::from_slice(&table[off..off + 20]).expect("cpu");
                assert_eq!(entry.type_, MP_PROCESSOR);
                assert_eq!(entry.apicid, cpu);
                let bsp = if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
                assert_eq!(entry.cpuflag, CPU_ENABLED | bsp);
                off += 20;
            }
            let bus = MpcBus::from_slice(&table[off..off + 8]).expect("bus");
            assert_eq!((bus.type_, bus.bustype), (MP_BUS, *b"ISA   "));
            off += 8;
            let ioapic = MpcIoapic::from_slice(&table[off..off + 8]).expect("ioapic");
            assert_eq!(ioapic.type_, MP_IOAPIC);
            assert_eq!(ioapic.apicid, cpus + 1);
            assert_eq!(ioapic.apicaddr, 0xfec0_0000);
            off += 8;
            for irq in 0..24u8 {
                let src = MpcIntsrc::from_slice(&table[off..off + 8]).expect("intsrc");
                assert_eq!(
                    (src.type_, src.srcbusirq, src.dstirq, src.dstapic),
                    (MP_INTSRC, irq, irq, cpus + 1)
                );
                off += 8;
            }
            let lint0 = MpcLintsrc::from_slice(&table[off..off + 8]).expect("lint0");
            assert_eq!((lint0.irqtype, lint0.destapiclint), (MP_EXTINT, 0));
            let lint1 = MpcLintsrc::from_slice(&table[off + 8..off + 16]).expect("lint1");
            assert_eq!((lint1.irqtype, lint1.destapiclint), (MP_NMI, 1));
            assert_eq!(off + 16, table.len());
        }
    }

    #[test]
    fn too_many_cpus_is_rejected() {
        assert_eq!(
            setup_mptable(&mem(), MAX_VCPUS + 1),
            Err(MptableError::TooManyCpus(MAX_VCPUS + 1))
        );
        assert_eq!(setup_mptable(&mem(), 0), Err(MptableError::NoCpus));
    }

    #[test]
    fn too_little_memory_is_rejected() {
        let small =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9f000)]).expect("mmap");
        assert_eq!(setup_mptable(&small, 1), Err(MptableError::NotEnoughMemory));
    }
}
